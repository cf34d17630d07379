"""Checkpoint files: atomic writes, safe reads, choosing what to resume from, and the manager
that saves and restores every stateful part of training.

A checkpoint is ``out_dir/checkpoints/ckpt-<step:08d>.pt``: a dict of tensors and plain values
only, written to a temporary file, flushed, fsynced and renamed, so the newest file is never
half-written. Reading uses ``torch.load(weights_only=True)``: a file crafted to run code is
refused. A read that fails with an OSError (EIO, ESTALE on a network file system) is retried.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ddp_diffusion import files
from ddp_diffusion.config import FROZEN_KEYS, flatten, from_dict, to_dict
from ddp_diffusion.errors import CheckpointError, CheckpointGone, UserError

log = logging.getLogger("ddp_diffusion")
NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
FORMAT = 2  # 1: before the `progress` part (step, images seen and run id at the top level)
READ_TRIES = 3
READ_RETRY_S = 1.0  # first back-off; doubled after each failed try

class Part:
    """The names of the checkpointed parts: the keys of the `states` that train.py gives
    CheckpointManager, and of the checkpoint dict; code that reads a part uses these."""

    MODEL = "model"  # the raw weights
    EMA = "ema"  # the EMA weights
    OPTIMIZER = "optimizer"
    GRAD_SCALER = "grad_scaler"
    DATA = "data"  # the data source: its classes, size and fingerprints
    PROGRESS = "progress"  # step, images seen, run id, non-finite steps
    POSTHOC_EMA = "posthoc_ema"  # the power-function EMAs of train.ema_posthoc, by sigma_rel


class Stateful(Protocol):
    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any], /) -> Any: ...


def path_for(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"ckpt-{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in the folder, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def write_atomic(obj: dict[str, Any], path: Path) -> Path:
    """torch.save `obj` to `path` whole (files.write_atomic: temp file, fsync, rename); on
    failure what `path` held is untouched and WriteFailed says why."""
    return files.write_atomic(path, lambda f: torch.save(obj, f))


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint dict in the current format (older files are read as they were written).

    Its config is completed with the current defaults; runs from before other datasets were
    Fashion-MNIST, greyscale."""
    config = state.get("config")
    if isinstance(config, dict):
        config.setdefault("model", {}).setdefault("in_channels", 1)
        state["config"] = to_dict(from_dict(config))
    if state.get("format", 1) == 1:
        state = dict(state)
        state[Part.PROGRESS] = {"step": int(state["step"]),
                             "images_seen": int(state.pop("images_seen", 0)),
                             "run_id": state.pop("wandb_run_id", None), "nonfinite_total": 0}
        state[Part.DATA] = {}  # format 1 did not describe the data source
        for dropped in ("lr_schedule", "rng", "data_position"):  # now derived from the step
            state.pop(dropped, None)
        state["format"] = FORMAT
    return state


def read(path: Path, tries: int = READ_TRIES) -> dict[str, Any]:
    """Load a checkpoint on the CPU (weights_only=True), or raise CheckpointError saying why.

    OSErrors (EIO, ESTALE, ...) are retried `tries` times with back-off; a file that is gone
    (CheckpointGone), truncated, corrupt or holds objects other than tensors and plain values
    fails at once.
    """
    delay = READ_RETRY_S
    for attempt in range(1, tries + 1):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                path, "refused, it holds objects other than tensors and plain values "
                f"(weights_only load): {_first_line(e)}") from None
        except OSError as e:
            if isinstance(e, FileNotFoundError) and not os.path.lexists(path):
                # Its name is gone from the folder (pruned): retrying cannot bring it back. A
                # name that is still there (a stale NFS handle, a dangling link) is retried.
                raise CheckpointGone(path, "no such file (deleted after it was listed)") from None
            if attempt == tries:
                raise CheckpointError(path, f"read error, {tries} tries ({e.strerror or e}); "
                                            "check the file system") from None
            log.warning("%s: read error (%s), try %d of %d; retrying in %g s", path,
                        e.strerror or e, attempt, tries, delay)
            time.sleep(delay)
            delay *= 2
        except Exception as e:  # bytes that are no checkpoint fail in many ways (an empty
            # file: EOFError; a text file: KeyError; a torn one: RuntimeError)
            raise CheckpointError(path, "unreadable (truncated or corrupt): "
                                        f"{_first_line(e)}") from None
    if (not isinstance(state, dict) or "step" not in state or Part.MODEL not in state
            or not isinstance(state.get("config"), dict)):
        raise CheckpointError(path, "not a ddp-diffusion checkpoint (no step, model or config)")
    try:
        return upgrade(state)
    except (UserError, KeyError, TypeError, ValueError) as e:  # its config, not the user's
        raise CheckpointError(path, f"its config does not fit this version ({e})") from None


def _first_line(e: BaseException) -> str:
    """An exception's type and the first line of its message."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def newest_readable(ckpt_dir: Path) -> tuple[tuple[Path, dict[str, Any]] | None,
                                             list[CheckpointError]]:
    """The newest checkpoint that reads (None if none does), and why each newer one did not.

    A file deleted between the listing and the read (a running job pruned it, and has written a
    newer one) makes it list the folder again rather than fall back to an older file.
    """
    failures: list[CheckpointError] = []
    while True:
        for _, path in reversed(list_checkpoints(ckpt_dir)):
            if path in (e.path for e in failures):
                continue
            try:
                return (path, read(path)), failures
            except CheckpointGone:
                log.info("checkpoint %s was deleted while being read; listing %s again", path,
                         ckpt_dir)
                break
            except CheckpointError as e:
                log.warning("skipping checkpoint %s; trying the previous one", e)
                failures.append(e)
        else:
            return None, failures


def none_readable(ckpt_dir: Path, failures: list[CheckpointError]) -> str:
    """The message for a folder whose checkpoints all fail to read: each file and why."""
    return (f"no checkpoint in {ckpt_dir} can be read: {'; '.join(map(str, failures))}")


@dataclass
class ResumePlan:
    """What `train.resume` resolves to in a run directory."""

    path: Path | None  # the checkpoint to resume from (None: start at step 0)
    state: dict[str, Any] | None
    move_aside: list[Path]  # checkpoints of another lineage, or ones that would be overwritten
    new_run: bool  # a different run starts here: the earlier run's files move aside too


def plan_resume(resume: str, ckpt_dir: Path) -> ResumePlan:
    """Resolve train.resume (auto, never or a path) against the checkpoints in ckpt_dir.

    auto: the newest checkpoint that loads; newer ones that do not are moved aside, never
    overwritten. If checkpoints exist and none loads, raise UserError listing each and why:
    starting over is an explicit choice (never). never: a new run; the old one moves aside.
    A path inside ckpt_dir continues that lineage (newer checkpoints move aside); a path
    elsewhere starts a new lineage here.
    """
    ckpts = list_checkpoints(ckpt_dir)
    if resume == "never":
        return ResumePlan(None, None, [p for _, p in ckpts], new_run=True)
    if resume == "auto":
        found, failures = newest_readable(ckpt_dir)
        if found is None and failures:
            raise UserError(
                f"{none_readable(ckpt_dir, failures)}. Nothing was changed. Restore a good file, "
                "or start over with train.resume=never (the old files move to "
                f"{ckpt_dir.parent / 'archive'}/)")
        path, state = found or (None, None)
        return ResumePlan(path, state, [e.path for e in failures], new_run=False)
    path = Path(resume)
    try:
        state = read(path)
    except CheckpointError as e:
        raise UserError(f"train.resume={resume}: {e}") from None
    if path.resolve().parent == ckpt_dir.resolve():
        newer = [p for s, p in ckpts if s > int(state["step"])]
        return ResumePlan(path, state, newer, new_run=False)
    return ResumePlan(path, state, [p for _, p in ckpts], new_run=True)


# What a checkpoint records about its run rather than what training computed: two runs of the
# same steps on the same data differ only in these (and in the W&B run id of `progress`).
RUN_RECORD = ("format", "config", "versions", "world_size")


def training_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two checkpoints differ in what training computed, bit for bit (every part but
    RUN_RECORD and the run id): one 'where: how' per difference, none for the same training."""
    def diff(x: object, y: object, where: str) -> list[str]:
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape):
                return [f"{where}: a tensor {tuple(x.shape)} {x.dtype} vs {y!r:.60}"]
            return [] if torch.equal(x, y) else [
                f"{where}: max difference {(x.double() - y.double()).abs().max().item():.3g}"]
        if isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                return [f"{where}: keys {sorted(map(str, x.keys() ^ y.keys()))} in one only"]
            return [d for k in x for d in diff(x[k], y[k], f"{where}.{k}")]
        if isinstance(x, list | tuple) and isinstance(y, list | tuple) and len(x) == len(y):
            return [d for i, (u, v) in enumerate(zip(x, y, strict=True))
                    for d in diff(u, v, f"{where}[{i}]")]
        return [] if x == y else [f"{where}: {x!r:.60} != {y!r:.60}"]

    def trained(state: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in state.items() if k not in RUN_RECORD}
        out[Part.PROGRESS] = {k: v for k, v in state[Part.PROGRESS].items() if k != "run_id"}
        return out

    return diff(trained(a), trained(b), "checkpoint")


def frozen_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each frozen setting that differs between two configs."""
    old, new = flatten(saved), flatten(current)
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and k in FROZEN_KEYS]


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key old -> new' for each setting that differs (train.resume excluded)."""
    old, new = flatten(saved), flatten(current)
    return [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and k != "train.resume"]


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path | str) -> None:
    """Raise UserError if a frozen setting changed since the checkpoint was written."""
    frozen = frozen_changes(saved, current)
    if frozen:
        raise UserError(
            f"cannot resume from {path}: {', '.join(frozen)} changed, and that breaks "
            "resumption. Nothing was changed. Use a new out_dir, or train.resume=never to start "
            "a new run here (the old one moves to out_dir/archive/)")


class CheckpointManager:
    """Saves and restores every stateful part of training; prunes this run's old checkpoints.

    `states` maps a name to an object with state_dict()/load_state_dict(): `save` writes all of
    them into one file and `restore` loads all of them, so a part added to the mapping is
    checkpointed and restored with no other change. Retention only ever deletes checkpoints of
    this run's lineage (those it resumed from or wrote), never the one just written.
    """

    def __init__(self, ckpt_dir: Path, states: dict[str, Stateful], keep_last: int,
                 milestone_every: int) -> None:
        self.ckpt_dir = ckpt_dir
        self.states = states
        self.keep_last = keep_last
        self.milestone_every = milestone_every
        # At start the folder holds this lineage only: other runs' files were moved aside.
        self.lineage: dict[int, Path] = dict(list_checkpoints(ckpt_dir))

    def save(self, step: int, meta: dict[str, Any]) -> Path:
        """Write every part (plus `meta`) as the checkpoint of `step`, then prune."""
        state = {"format": FORMAT, "step": step, **meta,
                 **{name: part.state_dict() for name, part in self.states.items()}}
        path = write_atomic(state, path_for(self.ckpt_dir, step))
        self.lineage[step] = path
        self._prune(keep=step)
        return path

    def restore(self, state: dict[str, Any], path: Path | str) -> None:
        """Load every part from a checkpoint dict (as `read` returns it)."""
        missing = [name for name in self.states if name not in state]
        if missing:
            raise UserError(f"{path} cannot be resumed: it has no {', '.join(missing)} (a "
                            "checkpoint written for sampling only)")
        for name, part in self.states.items():
            part.load_state_dict(state[name])

    def _prune(self, keep: int) -> None:
        """Keep the newest `keep_last` of this lineage plus milestones; never `keep`."""
        if self.keep_last <= 0:
            return
        for step in sorted(self.lineage)[:-self.keep_last]:
            if step != keep and not (self.milestone_every and step % self.milestone_every == 0):
                self.lineage.pop(step).unlink(missing_ok=True)
