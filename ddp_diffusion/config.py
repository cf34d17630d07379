"""Typed run configuration: dataclasses, YAML loading and dotted command-line overrides."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class UserError(Exception):
    """A mistake the user can fix; the CLI prints it as one line, without a traceback."""


@dataclass
class ModelConfig:
    name: str = "unet"  # "unet" (ours) or "seed_unet" (the code-along's U-Net, exactly)
    num_classes: int = 10
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
    beta_schedule: str = "linear"  # linear | cosine
    loss: str = "hybrid"  # hybrid (learned variance, as the code-along) | mse
    cfg_dropout: float = 0.1  # probability a label is replaced by the learned null embedding
    clamp_x0: bool = True


@dataclass
class DataConfig:
    root: str = "data"
    download: bool = False
    debian_dir: str = "/usr/share/datasets/fashion-mnist"


@dataclass
class TrainConfig:
    batch_size: int = 192  # global: summed over ranks and accumulation micro-steps
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: str = "constant"  # constant | cosine (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 where the hardware has it)
    channels_last: bool = False
    compile: bool = False
    ema_halflife_kimg: float = 10.0  # EMA half-life in thousands of training images (EDM)
    ema_rampup_ratio: float = 0.05  # half-life never exceeds this fraction of images seen
    log_every: int = 10
    sample_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3
    milestone_every: int = 0  # also keep every checkpoint whose step is a multiple of this
    resume: str = "auto"  # auto | never | PATH to a checkpoint
    max_nonfinite: int = 5  # abort after this many non-finite losses in a row
    num_threads: int = 0  # CPU threads per rank; 0 = cores / local ranks
    profile_steps: int = 0  # torch.profiler over this many steps -> out_dir/profile.txt
    time_limit_minutes: float = 0.0  # save and stop (exit 0) after this long in the loop; 0 = off


@dataclass
class SampleConfig:
    sampler: str = "ddpm"  # ddpm | ddim
    steps: int = 250
    guidance: float = 2.0  # CFGuidance: (1+g)*cond - g*uncond, so 0 means no guidance
    eta: float = 0.0  # DDIM only
    per_class: int = 8
    use_ema: bool = True


@dataclass
class FidConfig:
    every: int = 0  # in training: FID with the EMA weights every N steps, on all ranks (0 = off)
    num_samples: int = 2000  # generated images per evaluation (the fid command: 10000)
    sampler: str = "ddim"  # ddpm | ddim (eta: sample.eta)
    steps: int = 50
    guidance: float = 2.0
    features: str = "fashion"  # fashion (shipped classifier) | inception (torchmetrics 2048-d)
    reference: str = "train"  # real images: train (60k) | test (10k)
    inception_weights: str | None = None  # local weights-inception-2015-12-05-6726825d.pth
    batch_size: int = 250  # images per generation chunk; the sample set depends on it


@dataclass
class TrackingConfig:
    wandb: str = "offline"  # offline | online | disabled
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


CHOICES: dict[str, tuple[str, ...]] = {
    "model.name": ("unet", "seed_unet"),
    "diffusion.beta_schedule": ("linear", "cosine"),
    "diffusion.loss": ("hybrid", "mse"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "sample.sampler": ("ddpm", "ddim"),
    "fid.sampler": ("ddpm", "ddim"),
    "fid.features": ("fashion", "inception"),
    "fid.reference": ("train", "test"),
    "tracking.wandb": ("offline", "online", "disabled"),
}


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
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, dict | list):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise UserError(
            f"config key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}"
        ) from None
    raise UserError(f"config key '{key}' has an unsupported type {tp}")


def _check_choice(key: str, value: Any) -> None:
    choices = CHOICES.get(key)
    if choices is not None and value not in choices:
        raise UserError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key (e.g. 'train.lr') on cfg, with type coercion and validation."""
    *path, leaf = key.split(".")
    node: Any = cfg
    for part in path:
        if not dataclasses.is_dataclass(node) or part not in _fields(type(node)):
            raise _unknown_key(key)
        node = getattr(node, part)
    fields_ = _fields(type(node)) if dataclasses.is_dataclass(node) else {}
    if leaf not in fields_ or dataclasses.is_dataclass(fields_[leaf]):
        raise _unknown_key(key)
    coerced = _coerce(key, value, fields_[leaf])
    _check_choice(key, coerced)
    setattr(node, leaf, coerced)


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


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or defaults when path is None) and apply 'a.b=value' overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        with path.open() as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping of sections")
    cfg = from_dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"override '{item}' must look like key=value, e.g. train.lr=2e-4")
        set_key(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain nested dict (YAML- and checkpoint-safe)."""
    return dataclasses.asdict(cfg)


def save(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
