"""A trained run read back from its run directory: the checkpoint a command uses (named, or the
newest readable one), and the config, denoiser, diffusion and class names it holds."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from ddp_diffusion import checkpoint, rundir
from ddp_diffusion.config import Config, from_dict
from ddp_diffusion.diffusion import ConditionalDenoiser, Diffusion, build_denoiser
from ddp_diffusion.errors import CheckpointError, UserError
from ddp_diffusion.sources import CLASS_NAMES


def find_checkpoint(run_dir: Path, ckpt_path: Path | None) -> tuple[Path, dict]:
    """The checkpoint a command reads: `ckpt_path`, or the newest readable one of the run."""
    if ckpt_path is not None:
        if not ckpt_path.is_file():
            raise UserError(f"--checkpoint {ckpt_path}: no such file")
        try:
            return ckpt_path, checkpoint.read(ckpt_path)
        except CheckpointError as e:
            raise UserError(str(e)) from None
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the out_dir of a run")
    ckpt_dir = run_dir / rundir.CHECKPOINTS
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
    denoiser.load_state_dict(state[checkpoint.Part.EMA] if ema else state[checkpoint.Part.MODEL])
    names = tuple(state[checkpoint.Part.DATA].get("class_names", CLASS_NAMES))
    return Run(cfg, denoiser.to(device).eval(), diffusion, int(state["step"]), names)
