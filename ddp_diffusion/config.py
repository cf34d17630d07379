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


@dataclass
class ModelConfig:
    name: ModelName = "unet"  # seed_unet: the code-along's U-Net, exactly
    num_classes: int | None = None  # None: from the data (1 for an unconditional model)
    in_channels: int | None = None  # None: from the data (1 greyscale, 3 RGB)
    image_size: int = 32
    cond_dim: int = 32  # class-embedding width (seed_unet: also the timestep-embedding width)
    channels: int = 64  # unet: width of the first level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [8])
    dropout: float = 0.0


@dataclass
class DiffusionConfig:
    steps: int = 1000
    beta_schedule: Literal["linear", "cosine"] = "linear"
    loss: Literal["hybrid", "mse"] = "hybrid"  # hybrid: learned variance, as the code-along
    cfg_dropout: float = 0.1  # probability a label is replaced by the learned null embedding
    clamp_x0: bool = True


@dataclass
class DataConfig:
    dataset: DatasetName = "fashion_mnist"
    root: str = "data"  # torchvision datasets, FID reference statistics, folder check cache
    path: str | None = None  # image_folder: a folder of class subfolders (or of images)
    download: bool = False
    debian_dir: str = "/usr/share/datasets/fashion-mnist"
    loader: Literal["auto", "memory", "stream"] = "auto"  # auto: memory if it fits in 2 GiB
    num_workers: int = 4  # stream loader (and the image check): decoding worker processes
    hflip: bool = False  # random horizontal flips, drawn per sample from (seed, step, index)
    class_conditional: bool = True  # false: one class, an unconditional model
    channels: int = 0  # image_folder: 0 = 3 if any image is in colour, else 1; or 1 or 3


@dataclass
class TrainConfig:
    batch_size: int = 192  # global: summed over ranks and accumulation micro-steps
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after the warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where it is native
    channels_last: bool = False
    compile: bool = False
    ema_halflife_kimg: float = 10.0  # EMA half-life in thousands of training images (EDM)
    ema_rampup_ratio: float = 0.05  # half-life never exceeds this fraction of images seen
    # Post-hoc EMA (EDM2): power-function EMAs of these relative lengths, snapshotted every N
    # steps to out_dir/posthoc/, from which `ddp-diffusion ema` makes an EMA of any length.
    ema_posthoc: bool = False
    ema_posthoc_sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    ema_posthoc_every: int = 500
    log_every: int = 10
    sample_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3  # newest checkpoints of this run kept; 0 = keep all
    milestone_every: int = 0  # also keep every checkpoint whose step is a multiple of this
    resume: str = "auto"  # auto | never | PATH to a checkpoint
    lock_wait_s: float = 300.0  # a requeued job waits this long for its predecessor's lock
    max_nonfinite: int = 5  # abort after this many non-finite losses in a row
    sync_every: int = 10  # the host waits for the device (stop agreement, non-finite report)
    deterministic: bool = False  # deterministic kernels, no cuDNN autotuning: bitwise on CUDA
    peak_tflops: float = 0.0  # per device, for the logged fraction of peak; 0 = GPU table
    num_threads: int = 0  # CPU threads per rank; 0 = cores / local ranks
    profile_steps: int = 0  # torch.profiler over this many steps -> out_dir/profile.txt
    time_limit_minutes: float = 0.0  # save and stop (exit 0) after this long in the loop; 0 = off


@dataclass
class SampleConfig:
    # SDE DPM-Solver++ at 25 evaluations: within 10% of DDPM 250's FID (docs/evaluation.md)
    sampler: Sampler = "sde-dpm++"
    steps: int = 25
    guidance: float = 2.0  # CFGuidance: (1+g)*cond - g*uncond, so 0 means no guidance
    eta: float = 0.0  # DDIM only
    per_class: int = 8
    use_ema: bool = True  # grids from the EMA weights (the sample command: --no-ema)


@dataclass
class FidConfig:
    every: int = 0  # in training: FID with the EMA weights every N steps, on all ranks (0 = off)
    num_samples: int = 2000  # generated images per evaluation (the fid command: 10000)
    sampler: Sampler = "sde-dpm++"  # eta (ddim only): sample.eta
    steps: int = 25
    guidance: float = 2.0
    features: Literal["fashion", "inception"] = "fashion"  # inception: torchmetrics 2048-d
    reference: Literal["train", "test"] = "train"  # real images: train (60k) or test (10k)
    inception_weights: str | None = None  # local weights-inception-2015-12-05-6726825d.pth
    # real statistics (mu, sigma) in an .npz, e.g. published ones, instead of `reference`'s
    ref_stats: str | None = None
    batch_size: int = 250  # images per generation chunk; the sample set depends on it


@dataclass
class TrackingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "ddp-diffusion"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    out_dir: str = "runs/default"
    seed: int = 0


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
