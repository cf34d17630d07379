"""Typed run configuration: dataclasses, YAML loading, dotted overrides, and validation.

Every value is checked when the config is loaded (types, `Literal` choices, ranges and the
rules that tie keys together), so a bad setting fails with one line before any work is done.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ddp_diffusion import files, posthoc, registry
from ddp_diffusion.errors import UserError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The registered names (registry.py) as Literal types: any other value is refused, naming them.
ModelName = Literal[tuple(registry.MODELS)]
DatasetName = Literal[tuple(registry.DATASETS)]
Sampler = Literal[tuple(registry.SAMPLERS)]


# Resume policies of a key (`ddp-diffusion config` prints each; the README's table is made from
# them). FROZEN keys define the network, the noise process, or which samples and noise each
# step sees: a run refuses to resume when one changed (checkpoint.check_compatible). Every other
# key may change and takes effect from the resumed step.
FROZEN = "frozen"
TAKES_EFFECT = "takes effect"
SAME_DATA = "takes effect (the data must be the same: its fingerprint is checked)"


def key(default: Any, doc: str, resume: str = TAKES_EFFECT) -> Any:
    """A config field with its one-line doc and resume policy (a list default is copied)."""
    meta = {"doc": doc, "resume": resume}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: ModelName = key("unet", "the network: unet, or seed_unet (the code-along's U-Net, "
                          "exactly)", FROZEN)
    num_classes: int | None = key(None, "classes; null: from the data (1 for an unconditional "
                                  "model); set only to assert what the data has", FROZEN)
    in_channels: int | None = key(None, "image channels; null: from the data (1 greyscale, 3 "
                                  "RGB); set only to assert what the data has", FROZEN)
    image_size: int = key(32, "side of the square images the model makes (a multiple of 4 for "
                          "unet)", FROZEN)
    cond_dim: int = key(32, "class-embedding width (seed_unet: also the timestep embedding's)",
                        FROZEN)
    channels: int = key(64, "unet: width of the first level", FROZEN)
    channel_mult: list[int] = key([1, 2, 2], "unet: width of each level, times channels",
                                  FROZEN)
    num_res_blocks: int = key(2, "unet: residual blocks per level", FROZEN)
    attention_resolutions: list[int] = key([8], "unet: resolutions with self-attention",
                                           FROZEN)
    dropout: float = key(0.0, "dropout in the residual blocks", FROZEN)


@dataclass
class DiffusionConfig:
    steps: int = key(1000, "noise levels of the forward process", FROZEN)
    beta_schedule: Literal["linear", "cosine"] = key("linear", "noise schedule", FROZEN)
    loss: Literal["hybrid", "mse"] = key("hybrid", "hybrid: learned variance (the "
                                         "code-along's); mse: noise prediction only", FROZEN)
    cfg_dropout: float = key(0.1, "probability a label is replaced by the learned null "
                             "embedding (what classifier-free guidance needs)", FROZEN)
    clamp_x0: bool = key(True, "clamp the predicted clean image to [-1, 1] when sampling",
                         FROZEN)


@dataclass
class DataConfig:
    dataset: DatasetName = key("fashion_mnist", "fashion_mnist, mnist, cifar10, or "
                               "image_folder (with data.path)", SAME_DATA)
    root: str = key("data", "torchvision datasets, FID reference statistics and the folder "
                    "check's cache live here", SAME_DATA)
    path: str | None = key(None, "image_folder: a folder of class subfolders (or of images)",
                           SAME_DATA)
    download: bool = key(False, "let torchvision download the dataset (off: Debian's "
                         "Fashion-MNIST, or files already in data.root)")
    debian_dir: str = key("/usr/share/datasets/fashion-mnist", "Debian's dataset-fashion-mnist "
                          "files, used when data.root has none")
    loader: Literal["auto", "memory", "stream"] = key("auto", "memory (decoded once), stream "
                                                      "(decoding workers), auto: memory if it "
                                                      "fits in 2 GiB")
    num_workers: int = key(4, "stream loader and image check: decoding processes per rank")
    hflip: bool = key(False, "random horizontal flips, drawn per sample from (seed, step, "
                      "index)")
    class_conditional: bool = key(True, "false: one class, an unconditional model",
                                  "refused if it changes the model's classes")
    channels: int = key(0, "image_folder: 1 or 3, or 0 (3 if any image is in colour, else 1)",
                        "refused if it changes the model's channels")


@dataclass
class TrainConfig:
    batch_size: int = key(192, "global batch: summed over ranks and accumulation micro-steps; "
                          "must divide by world size x grad_accum", FROZEN)
    grad_accum: int = key(1, "micro-steps per optimizer step (DDP no_sync on all but the last)")
    max_steps: int = key(1000, "optimizer steps to train (also the cosine schedule's length)")
    lr: float = key(1e-4, "AdamW learning rate (after the warmup)")
    weight_decay: float = key(0.0, "AdamW weight decay")
    adam_betas: list[float] = key([0.9, 0.999], "AdamW betas, two numbers in [0, 1)")
    lr_schedule: Literal["constant", "cosine"] = key("constant", "after the warmup: constant, "
                                                     "or cosine down to min_lr_ratio x lr")
    warmup_steps: int = key(0, "linear warmup from 0 to lr over this many steps")
    min_lr_ratio: float = key(0.0, "cosine floor as a fraction of lr")
    grad_clip: float = key(1.0, "max global gradient norm; 0: no clipping (the norm is still "
                           "logged)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = key(
        "auto", "bf16 or fp16 autocast (fp16 with a loss scale), fp32; auto: bf16 where it is "
        "native")
    channels_last: bool = key(False, "channels-last memory format")
    compile: bool = key(False, "torch.compile the model (slow to compile on CPU)")
    ema_halflife_kimg: float = key(10.0, "EMA half-life in thousands of training images (EDM)")
    ema_rampup_ratio: float = key(0.05, "the half-life never exceeds this fraction of the "
                                  "images seen")
    ema_posthoc: bool = key(False, "post-hoc EMA (EDM2): track power-function EMAs and "
                            "snapshot them, so `ddp-diffusion ema` makes an EMA of any length",
                            FROZEN)
    ema_posthoc_sigma_rels: list[float] = key([0.05, 0.10], "the post-hoc EMAs' relative "
                                              "lengths, each in (0, 0.2887]", FROZEN)
    ema_posthoc_every: int = key(500, "steps between post-hoc snapshots (and the last step), "
                                 "written to out_dir/posthoc/")
    log_every: int = key(10, "steps between metrics lines (metrics.jsonl, W&B, the console)")
    sample_every: int = key(500, "steps between sample grids in out_dir/samples/ (0: none)")
    ckpt_every: int = key(500, "steps between checkpoints (and the last step, and on a stop)")
    keep_last: int = key(3, "newest checkpoints of this run kept; 0: keep all")
    milestone_every: int = key(0, "also keep every checkpoint whose step is a multiple of this "
                               "(0: none)")
    resume: str = key("auto", "auto (the newest checkpoint that loads), never (a new run; an "
                      "earlier one is moved aside), or the path of a ckpt-*.pt file",
                      "read when the run starts")
    lock_wait_s: float = key(300.0, "seconds a requeued job waits for its predecessor to "
                             "release out_dir")
    max_nonfinite: int = key(5, "abort after this many non-finite losses in a row (each is "
                             "skipped)")
    sync_every: int = key(10, "steps between the host's waits for the device (stop agreement, "
                          "non-finite report)")
    deterministic: bool = key(False, "deterministic kernels, no cuDNN autotuning: a GPU run "
                              "repeats and resumes bit for bit (slower)")
    peak_tflops: float = key(0.0, "peak TFLOP/s of one device, for the logged fraction of "
                             "peak; 0: the GPU table (none on CPU)")
    num_threads: int = key(0, "CPU threads per rank; 0: cores / local ranks")
    profile_steps: int = key(0, "torch.profiler over this many steps: out_dir/profile.txt and "
                             "a Perfetto trace")
    time_limit_minutes: float = key(0.0, "save a checkpoint and exit 0 at the first sync point "
                                    "after this long in the loop; 0: off")


@dataclass
class SampleConfig:
    sampler: Sampler = key("sde-dpm++", "sampler of grids and `sample` (SDE DPM-Solver++ at 25 "
                           "evaluations is within 10% of DDPM 250's FID)")
    steps: int = key(25, "network evaluations per image (at most diffusion.steps)")
    guidance: float = key(2.0, "classifier-free guidance g in (1+g)*cond - g*uncond: 0 means "
                          "none")
    eta: float = key(0.0, "DDIM only: 0 deterministic, 1 as stochastic as DDPM")
    per_class: int = key(8, "images per class in a grid")
    use_ema: bool = key(True, "grids from the EMA weights (the sample command: --no-ema)")


@dataclass
class FidConfig:
    every: int = key(0, "in training: FID with the EMA weights every N steps, on all ranks (0: "
                     "off)")
    num_samples: int = key(2000, "generated images per evaluation (the fid command: 10000)")
    sampler: Sampler = key("sde-dpm++", "sampler of FID's images (eta: sample.eta)")
    steps: int = key(25, "network evaluations per image")
    guidance: float = key(2.0, "classifier-free guidance of FID's images")
    features: Literal["fashion", "inception"] = key("fashion", "fashion: the shipped "
                                                    "classifier's; inception: torchmetrics' "
                                                    "2048-d")
    reference: Literal["train", "test"] = key("train", "the real images: the train or the test "
                                              "split")
    inception_weights: str | None = key(None, "a local weights-inception-2015-12-05-6726825d"
                                        ".pth (no download)")
    ref_stats: str | None = key(None, "real statistics (mu, sigma) in an .npz, e.g. published "
                                "ones, instead of fid.reference's")
    batch_size: int = key(250, "images per generation chunk; the sample set depends on it")


@dataclass
class TrackingConfig:
    wandb: Literal["offline", "online", "disabled"] = key("offline", "offline (no account; "
                                                          "`wandb sync` later), online, "
                                                          "disabled")
    project: str = key("ddp-diffusion", "W&B project")
    entity: str | None = key(None, "W&B entity (team or user); null: your default")
    name: str | None = key(None, "W&B run name; null: out_dir's name")
    group: str | None = key(None, "W&B group of runs shown together (a sweep sets it to its "
                            "folder's name)")
    tags: list[str] = key([], "W&B tags")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    out_dir: str = key("runs/default", "the run directory: checkpoints, metrics, grids, config")
    seed: int = key(0, "every random draw (data order, noise, dropout, sampling)", FROZEN)


TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off")


def _fields(cls: type) -> dict[str, Any]:
    """Map each field name of a dataclass to its resolved type."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config, e.g. 'train.lr'."""
    keys = []
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _frozen(cls: type = Config, prefix: str = "") -> list[str]:
    """The keys whose field says FROZEN."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _frozen(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata["resume"] == FROZEN:
            keys.append(prefix + f.name)
    return keys


# The keys a run cannot resume with changed (checkpoint.check_compatible).
FROZEN_KEYS = tuple(_frozen())


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise a one-line UserError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(key, value, args[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"config key '{key}' must be one of {', '.join(choices)}; "
                            f"got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise UserError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(key, v.strip() if isinstance(v, str) else v, item) for v in value]
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
                return value.lower() in TRUE_WORDS
            if isinstance(value, bool):
                return value
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str) and "e" in value.lower():  # 1e3: YAML leaves it a string
                value = float(value)
                if not value.is_integer():
                    raise ValueError
            if not INT64_MIN <= int(value) <= INT64_MAX:  # torch (seeds, sizes) takes int64
                raise UserError(f"config key '{key}' must fit in 64 bits (at most "
                                f"{INT64_MAX}); got {value}")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if value is None or value == "":  # `key:`, `key: ~`, `key: null`: never "None"
                raise UserError(f"config key '{key}' needs a value; YAML reads an empty value, "
                                "~ and null as nothing (quote it to mean the text)")
            if isinstance(value, dict | list):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(
            f"config key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}"
        ) from None
    raise UserError(f"config key '{key}' has an unsupported type {tp}")


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key (e.g. 'train.lr') on cfg, with type coercion."""
    *path, leaf = key.split(".")
    node: Any = cfg
    for part in path:
        if not dataclasses.is_dataclass(node) or part not in _fields(type(node)):
            raise _unknown_key(key)
        node = getattr(node, part)
    fields_ = _fields(type(node)) if dataclasses.is_dataclass(node) else {}
    if leaf not in fields_ or dataclasses.is_dataclass(fields_[leaf]):
        raise _unknown_key(key)
    setattr(node, leaf, _coerce(key, value, fields_[leaf]))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + str(k)] = v
    return flat


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a nested dict (as in YAML); unknown keys are errors."""
    cfg = Config()
    for key, value in flatten(data).items():
        set_key(cfg, key, value)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (which one was meant?)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _read_yaml(path: Path) -> dict[str, Any]:
    """A YAML config file as a dict, or a one-line UserError saying what is wrong with it."""
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        # A SafeLoader (plain values only, as yaml.safe_load) that also refuses repeated keys.
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                        f"at offset {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    except OSError as e:
        raise UserError(f"config file {path} cannot be read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', the value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise UserError(f"override '{item}' must look like key=value, e.g. train.lr=2e-4")
    if not raw.strip():
        return key.strip(), ""
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise UserError(f"override '{item}' is not a valid value ({_yaml_problem(e)}); quote "
                        f"it if it is a string: {key.strip()}='{raw}'") from None


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (defaults when path is None), apply 'a.b=value' overrides, validate."""
    cfg = from_dict(_read_yaml(Path(path)) if path is not None else {})
    for item in overrides:  # in order: a later key=value wins, so scripts can append overrides
        set_key(cfg, *_parse_override(item))
    validate(cfg)
    return cfg


def with_data_shape(m: ModelConfig, num_classes: int, channels: int) -> ModelConfig:
    """The model config with the data's number of classes and channels filled in; a value set
    in the config that differs from the data's is an error."""
    for key, value in (("num_classes", num_classes), ("in_channels", channels)):
        given = getattr(m, key)
        check(given in (None, value), f"model.{key}={given} but the data has {value}; remove "
                                      f"model.{key} (it comes from the data)")
    return dataclasses.replace(m, num_classes=num_classes, in_channels=channels)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain nested dict (YAML- and checkpoint-safe)."""
    return dataclasses.asdict(cfg)


def save(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML."""
    files.write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def check(ok: bool, message: str) -> None:
    """Raise a UserError with `message` unless `ok`."""
    if not ok:
        raise UserError(message)


def check_at_least(name: str, value: float, low: float) -> None:
    """`name` (a config key or a flag) must be a finite number >= low."""
    check(math.isfinite(value) and value >= low, f"{name}={value} must be >= {low:g}")


def check_fraction(name: str, value: float, upper_open: bool = False) -> None:
    """`name` must lie in [0, 1] (or [0, 1) with upper_open)."""
    ok = 0 <= value < 1 if upper_open else 0 <= value <= 1
    check(ok, f"{name}={value} must be in [0, 1{')' if upper_open else ']'}")


def check_finite(name: str, value: float) -> None:
    check(math.isfinite(value), f"{name}={value} must be a finite number")


def _name(prefix: str, key: str) -> str:
    """A config key ('sample.' + key) or a command-line flag ('--' + key with dashes)."""
    return prefix + (key.replace("_", "-") if prefix == "--" else key)


def _check_sampler(prefix: str, steps: int, guidance: float, diffusion_steps: int) -> None:
    """Sampler steps within the diffusion's steps, and a finite guidance scale."""
    check(1 <= steps <= diffusion_steps,
          f"{_name(prefix, 'steps')}={steps} must be in 1..{diffusion_steps} "
          f"(diffusion.steps={diffusion_steps})")
    check_finite(_name(prefix, "guidance"), guidance)


def check_sample(s: SampleConfig, diffusion_steps: int, prefix: str = "sample.") -> None:
    """Sampling settings (config keys, or the sample command's flags with prefix '--')."""
    _check_sampler(prefix, s.steps, s.guidance, diffusion_steps)
    check_at_least(_name(prefix, "eta"), s.eta, 0)
    check(s.eta == 0 or s.sampler == "ddim", f"{_name(prefix, 'eta')}={s.eta} only applies to "
                                             f"the ddim sampler, not {s.sampler}; leave it at 0")
    check_at_least(_name(prefix, "per_class"), s.per_class, 1)


def check_fid(f: FidConfig, diffusion_steps: int, prefix: str = "fid.") -> None:
    """FID settings (config keys, or the fid command's flags with prefix '--')."""
    _check_sampler(prefix, f.steps, f.guidance, diffusion_steps)
    check_at_least(_name(prefix, "num_samples"), f.num_samples, 2)
    check_at_least(_name(prefix, "batch_size"), f.batch_size, 1)
    check(f.ref_stats is None or f.ref_stats.endswith(".npz"),
          f"{_name(prefix, 'ref_stats')}={f.ref_stats}: name an .npz file of mu and sigma "
          "(ddp-diffusion fid-ref writes one)")


def has_fashion_classifier(cfg: Config) -> bool:
    """Whether the shipped classifier (FID features 'fashion', class accuracy) fits the run's
    data: Fashion-MNIST, by class, at 32x32."""
    return (cfg.data.dataset == "fashion_mnist" and cfg.data.class_conditional
            and cfg.model.image_size == 32)


def check_features(cfg: Config, features: str, name: str) -> None:
    """FID features 'fashion' only for data the Fashion-MNIST classifier fits."""
    check(features != "fashion" or has_fashion_classifier(cfg),
          f"{name}=fashion uses a Fashion-MNIST classifier (32x32, by class); for "
          f"{cfg.data.dataset} use {name}=inception")


def unet_resolutions(m: ModelConfig) -> list[int]:
    """The feature-map sizes of the UNet's levels, from image_size down."""
    return [m.image_size // 2**i for i in range(len(m.channel_mult))]


FP32_MAX = 3.4028234663852886e38

SEED_UNET_FIXED = ("channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                   "dropout")


def _validate_model(m: ModelConfig) -> None:
    for key in ("num_classes", "in_channels"):
        if getattr(m, key) is not None:
            check_at_least(f"model.{key}", getattr(m, key), 1)
    check_at_least("model.cond_dim", m.cond_dim, 1)
    registry.MODELS[m.name].check_settings(m)


def check_seed_unet(m: ModelConfig) -> None:
    """The code-along's U-Net: its fixed layers, two halvings of the image."""
    default = ModelConfig()
    for key in SEED_UNET_FIXED:
        check(getattr(m, key) == getattr(default, key),
              f"model.{key} has no effect with model.name=seed_unet (the code-along's fixed "
              "U-Net); remove it, or use model.name=unet")
    check(m.image_size >= 8 and m.image_size % 4 == 0,
          f"model.image_size={m.image_size} must be a multiple of 4 (>= 8): seed_unet halves "
          "it twice; e.g. 32")


def check_unet(m: ModelConfig) -> None:
    """The UNet's levels, attention resolutions and widths (GroupNorm, attention heads)."""
    check(len(m.channel_mult) > 0 and min(m.channel_mult) >= 1,
          f"model.channel_mult={m.channel_mult} must list one or more multipliers >= 1")
    check_at_least("model.num_res_blocks", m.num_res_blocks, 1)
    check_fraction("model.dropout", m.dropout, upper_open=True)
    halvings = len(m.channel_mult) - 1
    factor = 2**halvings
    check(m.image_size >= max(8, factor) and m.image_size % factor == 0,
          f"model.image_size={m.image_size} must be a multiple of {factor} (>= 8): the UNet "
          f"halves it {halvings} time(s), one per model.channel_mult level after the first; "
          f"e.g. {max(32, factor)}")
    resolutions = unet_resolutions(m)
    for r in m.attention_resolutions:
        check(r in resolutions, f"model.attention_resolutions: {r} is not a resolution of this "
                                f"UNet ({', '.join(map(str, resolutions))}); list some of those, "
                                "or [] for attention in the middle block only")
    for width in {m.channels * k for k in m.channel_mult}:
        check(width % 8 == 0, f"model.channels={m.channels}: every level's width (channels x "
                              f"channel_mult) must be a multiple of 8 for GroupNorm, {width} is "
                              "not; e.g. model.channels=32")
        heads = max(1, width // 32)
        check(width % heads == 0, f"model.channels={m.channels}: width {width} does not split "
                                  f"into {heads} attention heads of 32; e.g. model.channels=32")


def _validate_train(t: TrainConfig) -> None:
    for key in ("batch_size", "grad_accum", "max_steps", "log_every", "ckpt_every",
                "max_nonfinite", "sync_every"):
        check_at_least(f"train.{key}", getattr(t, key), 1)
    for key in ("warmup_steps", "sample_every", "keep_last", "milestone_every", "num_threads",
                "profile_steps", "weight_decay", "grad_clip", "ema_rampup_ratio",
                "time_limit_minutes", "lock_wait_s", "peak_tflops"):
        check_at_least(f"train.{key}", getattr(t, key), 0)
    check_batch(t.batch_size, 1, t.grad_accum)  # any world size: checked again when known
    check(0 < t.lr < FP32_MAX, f"train.lr={t.lr} must be a positive number (below "
                               f"{FP32_MAX:.2e}, the largest float32)")
    check(t.ema_halflife_kimg > 0 and math.isfinite(t.ema_halflife_kimg),
          f"train.ema_halflife_kimg={t.ema_halflife_kimg} must be a positive number")
    check_fraction("train.min_lr_ratio", t.min_lr_ratio)
    check_at_least("train.ema_posthoc_every", t.ema_posthoc_every, 1)
    check_sigma_rels("train.ema_posthoc_sigma_rels", t.ema_posthoc_sigma_rels)
    check(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas),
          f"train.adam_betas={t.adam_betas} must be two numbers in [0, 1), e.g. [0.9,0.999]")
    if t.resume not in ("auto", "never"):
        check(Path(t.resume).is_file(), f"train.resume={t.resume}: no such checkpoint file "
                                         "(use auto, never, or the path of a ckpt-*.pt file)")


def check_sigma_rel(name: str, value: float) -> None:
    """A post-hoc EMA length: 0 < sigma_rel <= 1/sqrt(12) (the average of every step)."""
    check(0 < value <= posthoc.SIGMA_REL_MAX,
          f"{name}={value} must be in (0, {posthoc.SIGMA_REL_MAX:.4f}] (a relative std of the "
          "averaging profile; EDM2 tracks 0.05 and 0.10)")


def check_sigma_rels(name: str, values: list[float]) -> None:
    """One or more distinct post-hoc EMA lengths."""
    check(len(values) > 0 and len(set(values)) == len(values),
          f"{name}={values} must list one or more different lengths, e.g. [0.05,0.10]")
    for value in values:
        check_sigma_rel(name, value)


def check_batch(batch_size: int, world_size: int, accum: int) -> int:
    """Per-rank micro-batch size, or a clear error when the global batch does not divide (where
    the world size is known: at submit and at the start of training)."""
    if batch_size % (world_size * accum):
        by = (f"world size {world_size} x train.grad_accum {accum}" if world_size > 1
              else f"train.grad_accum={accum}")
        raise UserError(f"train.batch_size={batch_size} is not divisible by {by}; "
                        f"choose a multiple of {world_size * accum}")
    return batch_size // (world_size * accum)


def _validate_data(d: DataConfig) -> None:
    check_at_least("data.num_workers", d.num_workers, 0)
    check(d.channels in (0, 1, 3), f"data.channels={d.channels} must be 0 (from the images), 1 "
                                   "or 3")
    registry.DATASETS[d.dataset].check_settings(d)


def check_image_folder(d: DataConfig) -> None:
    """A folder of images: data.path names it."""
    check(bool(d.path), "data.dataset=image_folder needs data.path, the folder of images")


def check_no_path(d: DataConfig) -> None:
    """A dataset that is not a folder of images: data.path is for those."""
    check(d.path is None, f"data.path has no effect with data.dataset={d.dataset}; remove it, "
                          "or use data.dataset=image_folder")


def validate(cfg: Config) -> None:
    """Check ranges and cross-key rules; raise a one-line UserError naming the fix."""
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    check_at_least("diffusion.steps", cfg.diffusion.steps, 2)
    check_fraction("diffusion.cfg_dropout", cfg.diffusion.cfg_dropout)
    _validate_train(cfg.train)
    check_sample(cfg.sample, cfg.diffusion.steps)
    check_fid(cfg.fid, cfg.diffusion.steps)
    check_at_least("fid.every", cfg.fid.every, 0)
    if cfg.fid.every:
        check_features(cfg, cfg.fid.features, "fid.features")
    check(bool(cfg.out_dir.strip()), "out_dir must not be empty")
