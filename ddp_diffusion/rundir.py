"""The run directory: one writer at a time, and an earlier run's files moved aside, never deleted.

``out_dir/train.lock`` is locked (``fcntl.flock``, which works on local disks and NFSv4) by rank
0 for the whole run and names its holder (host, pid, SLURM job). A second writer stops with one
line naming the holder; a requeued SLURM job, whose predecessor may still be saving, waits up to
``train.lock_wait_s`` for it.

Starting a different run in an ``out_dir`` that holds one (``train.resume=never``, or a resume
from a checkpoint elsewhere) moves the earlier run's checkpoints, metrics, config and sample
grids to ``out_dir/archive/<UTC time>/``, which nothing prunes.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO

from ddp_diffusion.errors import UserError

log = logging.getLogger("ddp_diffusion")

LOCK_NAME = "train.lock"
ARCHIVE = "archive"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
# What makes up a run besides its checkpoints (moved together when a new run starts).
RUN_FILES = (METRICS, "config.yaml", "samples")


def _holder_record() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def describe_holder(record: dict[str, object]) -> str:
    """'host h, pid p, SLURM job j, since t' from a lock file's record."""
    parts = [f"host {record.get('host', '?')}", f"pid {record.get('pid', '?')}"]
    if record.get("slurm_job_id"):
        parts.append(f"SLURM job {record['slurm_job_id']}")
    parts.append(f"since {record.get('since', '?')}")
    return ", ".join(parts)


class RunLock:
    """An exclusive lock on a run directory, held from `acquire` until `release` or exit."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self._file: IO[str] | None = None

    def _holder(self) -> dict[str, object]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, wait_s: float) -> None:
        """Take the lock, or raise UserError naming its holder.

        Only a requeued run of the same SLURM job waits (up to `wait_s`): its predecessor may
        still be saving its last checkpoint. Anyone else is a second writer and stops at once.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = self.path.open("a+")
        except OSError as e:
            raise UserError(f"out_dir {self.path.parent} cannot be used: {e.strerror or e}"
                            ) from None
        deadline = time.monotonic() + wait_s
        waiting = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder()
                ours = os.environ.get("SLURM_JOB_ID")
                same_job = ours is not None and str(holder.get("slurm_job_id")) == ours
                if not same_job or time.monotonic() >= deadline:
                    f.close()
                    waited = f" (waited {wait_s:g} s for it)" if same_job else ""
                    raise UserError(
                        f"{self.path.parent} is in use by another training run "
                        f"({describe_holder(holder)}){waited}: wait for it to finish or stop it, "
                        f"or use another out_dir (lock: {self.path})") from None
                if not waiting:
                    log.info("waiting up to %g s for the previous run of SLURM job %s to release "
                             "%s (%s)", wait_s, ours, self.path, describe_holder(holder))
                    waiting = True
                time.sleep(0.5)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder_record()) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        """Unlock (the file stays: removing it would race with the next writer)."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def remove_stale_temp_files(out_dir: Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that a killed run left behind (we hold the
    lock, so no write is in flight)."""
    stale = sorted((out_dir / CHECKPOINTS).glob(".ckpt-*.tmp-*"))
    stale += sorted(out_dir.glob(f"{METRICS}.tmp*"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temp file(s) of an interrupted write: %s", len(stale),
                 ", ".join(p.name for p in stale))
    return stale


def new_archive_dir(out_dir: Path) -> Path:
    """A fresh out_dir/archive/<UTC time>[-n] folder."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = out_dir / ARCHIVE / stamp
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{stamp}-{n}")
    path.mkdir(parents=True)
    return path


def move_aside(out_dir: Path, checkpoints: list[Path], whole_run: bool) -> Path | None:
    """Move checkpoints (and, for a whole run, its metrics, config and grids) to a new archive
    folder; a metrics.jsonl that stays is copied there too. Returns the folder, if any."""
    run_files = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    if not checkpoints and not (whole_run and run_files):
        return None
    dest = new_archive_dir(out_dir)
    (dest / CHECKPOINTS).mkdir()
    for path in checkpoints:
        os.replace(path, dest / CHECKPOINTS / path.name)
    if whole_run:
        for path in run_files:
            os.replace(path, dest / path.name)
    elif (out_dir / METRICS).is_file():
        shutil.copy2(out_dir / METRICS, dest / METRICS)  # the resumed run truncates the live one
    log.warning("moved %d checkpoint(s)%s of an earlier run to %s (nothing is deleted)",
                len(checkpoints), " and its metrics, config and grids" if whole_run else "", dest)
    return dest
