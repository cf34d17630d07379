"""Atomic checkpoint files, retention, and choosing what to resume from.

A checkpoint is ``out_dir/checkpoints/ckpt-<step:08d>.pt``: a dict of tensors and plain values
only, written to a temporary file, flushed, fsynced and renamed, so the newest file is never
half-written. Loading uses ``torch.load(weights_only=True)``: a file crafted to run code is
refused.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ddp_diffusion.config import UserError, flatten

log = logging.getLogger("ddp_diffusion")
NAME = re.compile(r"^ckpt-(\d{8})\.pt$")

# Config sections and keys that must not change when resuming: they define the model, the
# noise process, or which samples and noise each step sees.
FROZEN_KEYS = ("model", "diffusion", "seed", "train.batch_size")


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message names the file."""


def path_for(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"ckpt-{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in the folder, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def write_atomic(obj: dict[str, Any], path: Path) -> Path:
    """torch.save to a temp file beside `path`, flush, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save(state: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int,
         milestone_every: int = 0) -> Path:
    """Write a checkpoint atomically, then prune old checkpoints."""
    final = write_atomic(state, path_for(ckpt_dir, step))
    _prune(ckpt_dir, keep_last, milestone_every)
    return final


def _prune(ckpt_dir: Path, keep_last: int, milestone_every: int) -> None:
    """Keep the newest `keep_last` checkpoints plus milestones (step % milestone_every == 0)."""
    ckpts = list_checkpoints(ckpt_dir)
    for step, path in ckpts[:-keep_last] if keep_last > 0 else []:
        if not (milestone_every and step % milestone_every == 0):
            path.unlink(missing_ok=True)


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with weights_only=True, or raise CheckpointError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused, it holds objects other than tensors and plain values "
            f"(weights_only load): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable (truncated or corrupt): {e}") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a ddp-diffusion checkpoint")
    return state


def newest_loadable(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads cleanly; broken newer ones are reported and skipped."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s; trying the previous one", e)
    return None


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `train.resume` asks for: auto (newest loadable), never, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_loadable(ckpt_dir)
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"train.resume={resume}: no such checkpoint file")
    try:
        return path, load(path)
    except CheckpointError as e:
        raise UserError(str(e)) from None


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path | str) -> list[str]:
    """Raise UserError if a frozen setting changed; return the other changed keys (allowed)."""
    old, new = flatten(saved), flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    frozen = [k for k in changed if any(k == f or k.startswith(f + ".") for f in FROZEN_KEYS)]
    if frozen:
        details = ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in frozen)
        raise UserError(
            f"cannot resume from {path}: the config changed in a way that breaks resumption "
            f"({details}); use a new out_dir or train.resume=never")
    return changed
