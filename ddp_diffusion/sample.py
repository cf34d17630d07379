"""Class-conditional sampling with CFG, deterministic per seed, and labelled PNG grids."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from ddp_diffusion import checkpoint, files
from ddp_diffusion.config import Config, from_dict
from ddp_diffusion.data import derive_seed
from ddp_diffusion.diffusion import ConditionalDenoiser, Diffusion
from ddp_diffusion.errors import UserError
from ddp_diffusion.model import build_denoiser
from ddp_diffusion.precision import autocast
from ddp_diffusion.sources import CLASS_NAMES, SHORT_NAMES

LABEL_WIDTH = 84  # pixels left of each grid row for the class name


def parse_classes(spec: str, names: tuple[str, ...] = CLASS_NAMES) -> list[int]:
    """'all', or comma-separated class names or indices of a run's data -> indices.

    Fashion-MNIST also answers to the code-along's short names (sneaker, purse, boot, ...).
    """
    if spec.strip().lower() == "all":
        return list(range(len(names)))
    shown = SHORT_NAMES if names == CLASS_NAMES else names
    lookup = {n.lower(): i for i, n in enumerate(names)}
    lookup.update({n: i for i, n in enumerate(shown)})
    lookup.update({str(i): i for i in range(len(names))})
    out = []
    for item in (s.strip().lower() for s in spec.split(",") if s.strip()):
        if item not in lookup:
            listed = ", ".join(shown[:20]) + (", ..." if len(shown) > 20 else "")
            raise UserError(f"unknown class '{item}'; use one of: all, {listed} "
                            f"(or 0..{len(names) - 1})")
        out.append(lookup[item])
    if not out:
        raise UserError(f"--classes '{spec}' names no class; use all, or names or indices such "
                        f"as {','.join(shown[:2])} or 0,1")
    return out


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG (the samplers draw their noise from it) and restore it afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate(denoiser: ConditionalDenoiser, diffusion: Diffusion, labels: torch.Tensor,
             sampler: str, steps: int, guidance: float, seed: int, eta: float = 0.0,
             precision: str = "fp32", image_size: int = 32, channels: int = 1) -> torch.Tensor:
    """Images in [-1, 1] for the given labels; the same seed and labels give the same pixels."""
    device = next(denoiser.parameters()).device
    was_training = denoiser.training
    denoiser.eval()
    module = diffusion.sampler(denoiser, sampler, steps, guidance, eta)
    try:
        with seeded(derive_seed(seed, "sample"), device), autocast(device, precision):
            x = torch.randn(len(labels), channels, image_size, image_size, device=device)
            images = module(x, conditional_inputs=denoiser.condition(labels.to(device)))
    finally:
        denoiser.train(was_training)
    return images.float().clamp(-1, 1)


def save_grid(images: torch.Tensor, row_names: list[str] | tuple[str, ...], per_class: int,
              path: Path) -> Path:
    """An image file with one labelled row of `per_class` images per name (greyscale or RGB)."""
    grid = make_grid((images + 1) / 2, nrow=per_class, padding=2, pad_value=1.0)
    rgb = images.shape[1] == 3
    grid = (grid * 255).round().byte().cpu()
    pixels = grid.permute(1, 2, 0).numpy() if rgb else grid[0].numpy()  # make_grid: 1 -> 3
    tile = images.shape[-1] + 2
    canvas = Image.new("RGB" if rgb else "L", (pixels.shape[1] + LABEL_WIDTH, pixels.shape[0]),
                       color="white")
    canvas.paste(Image.fromarray(pixels), (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(row_names):
        draw.text((4, row * tile + tile // 2 - 5), name[:14], fill="black")
    fmt = Image.registered_extensions()[path.suffix.lower()]
    return files.write_atomic(path, lambda f: canvas.save(f, format=fmt))  # never via a link


def find_checkpoint(run_dir: Path, ckpt_path: Path | None) -> tuple[Path, dict]:
    """The checkpoint a command reads: `ckpt_path`, or the newest readable one of the run."""
    if ckpt_path is not None:
        if not ckpt_path.is_file():
            raise UserError(f"--checkpoint {ckpt_path}: no such file")
        try:
            return ckpt_path, checkpoint.read(ckpt_path)
        except checkpoint.CheckpointError as e:
            raise UserError(str(e)) from None
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the out_dir of a run")
    ckpt_dir = run_dir / "checkpoints"
    found, failures = checkpoint.newest_readable(ckpt_dir)
    if found is None:
        if failures:
            raise UserError(checkpoint.none_readable(ckpt_dir, failures))
        raise UserError(f"no checkpoints in {ckpt_dir}; train first (ddp-diffusion train "
                        f"out_dir={run_dir})")
    return found


class Run(NamedTuple):
    """A trained run, as a checkpoint holds it."""

    cfg: Config
    denoiser: ConditionalDenoiser
    diffusion: Diffusion
    step: int
    class_names: tuple[str, ...]


def load_run(run_dir: Path, ckpt_path: Path | None, use_ema: bool | None, device: torch.device
             ) -> Run:
    """Config, denoiser (EMA or raw weights; None: the run's sample.use_ema), diffusion, step
    and class names of a run's checkpoint."""
    _, state = find_checkpoint(run_dir, ckpt_path)
    cfg = from_dict(state["config"])
    diffusion = Diffusion(cfg.diffusion)
    denoiser = build_denoiser(cfg.model, diffusion.num_timesteps)
    ema = cfg.sample.use_ema if use_ema is None else use_ema
    denoiser.load_state_dict(state["ema"] if ema else state["model"])
    names = tuple(state["data"].get("class_names", CLASS_NAMES))
    return Run(cfg, denoiser.to(device).eval(), diffusion, int(state["step"]), names)
