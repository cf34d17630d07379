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
import re
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import IO

from ddp_diffusion import files
from ddp_diffusion.errors import UserError

log = logging.getLogger("ddp_diffusion")

LOCK_NAME = "train.lock"
ARCHIVE = "archive"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
SAMPLES = "samples"
WANDB = "wandb"  # made by wandb.init(dir=out_dir)
SLURM = "slurm"  # submitit's job scripts and logs, unless submit --folder says otherwise
POSTHOC = "posthoc"  # snapshots of the post-hoc EMAs (train.ema_posthoc): posthoc-<step>.pt
POSTHOC_NAME = re.compile(r"^posthoc-(\d{8})\.pt$")
# What makes up a run besides its checkpoints (moved together when a new run starts).
RUN_FILES = (METRICS, CONFIG, SAMPLES, POSTHOC)
# What the trainer writes in out_dir: folders (which may be the user's own links to another
# disk) and files (never followed if they are links).
RUN_FOLDERS = (CHECKPOINTS, SAMPLES, WANDB, POSTHOC)
PROFILE, TRACE = "profile.txt", "profile_trace.json"
RUN_FILES_WRITTEN = (LOCK_NAME, METRICS, CONFIG, PROFILE, TRACE)


def snapshot_path(out_dir: Path, step: int) -> Path:
    """The post-hoc EMA snapshot of a step."""
    return out_dir / POSTHOC / f"posthoc-{step:08d}.pt"


def list_snapshots(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every post-hoc EMA snapshot of the run, oldest first."""
    folder = out_dir / POSTHOC
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir()
                  if (m := POSTHOC_NAME.match(p.name)))


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

    def _open(self) -> IO[str]:
        """Open (or create) the lock file, never through a symbolic link."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise UserError(f"out_dir {self.path.parent} cannot be used: {files.reason(e)}"
                            ) from None
        return os.fdopen(fd, "r+")

    def _is_current(self, f: IO[str]) -> bool:
        """Whether `f` is still the file at the lock's path (not removed or replaced)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(f.fileno())
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def acquire(self, wait_s: float) -> None:
        """Take the lock, or raise UserError naming its holder.

        Only a requeued run of the same SLURM job waits (up to `wait_s`): its predecessor may
        still be saving its last checkpoint. Anyone else is a second writer and stops at once.
        A lock file removed or replaced between our open and our lock is opened again: the lock
        that counts is the one on the file at the path.
        """
        deadline = time.monotonic() + wait_s
        waiting = False
        while True:
            f = self._open()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                holder = self._holder()
                ours = os.environ.get("SLURM_JOB_ID")
                same_job = ours is not None and str(holder.get("slurm_job_id")) == ours
                if not same_job or time.monotonic() >= deadline:
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
                continue
            if self._is_current(f):
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder_record()) + "\n")
        f.flush()
        self._file = f

    def still_held(self) -> str | None:
        """None while this run holds the lock file at the lock's path. A removed lock file is
        made and taken again (the run goes on, with a warning). A replaced one means another
        run took out_dir meanwhile: the reason this run must stop writing."""
        if self._file is None or self._is_current(self._file):
            return None
        old, self._file = self._file, None
        try:
            if os.path.lexists(self.path):
                return (f"{self.path} was replaced while this run held it: another run "
                        f"({describe_holder(self._holder())}) has written to {self.path.parent} "
                        "since, so this run stopped without writing more there")
            log.warning("%s was removed while this run held it; taking it again", self.path)
            self.acquire(0)
        except UserError as e:
            return f"{self.path} was removed while this run held it and another run took it: {e}"
        finally:
            old.close()
        return None

    def release(self) -> None:
        """Unlock (the file stays: removing it would race with the next writer)."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def check_layout(out_dir: Path) -> None:
    """Refuse, before anything in out_dir changes, an entry the trainer writes that is not what
    it must be: a file planted as a symbolic link (never followed: someone who can write a
    shared run directory could point it at your files), a folder that is a file, a broken link
    or another user's link to a folder, or a place that cannot be written (a read-only mount)."""
    def refuse(path: Path, why: str) -> UserError:
        return UserError(f"{path} {why}; nothing was changed")

    for name in (*RUN_FOLDERS, *RUN_FILES_WRITTEN, ARCHIVE):
        path = out_dir / name
        if not os.path.lexists(path):
            continue
        st = os.lstat(path)
        is_link = stat.S_ISLNK(st.st_mode)
        if is_link and name not in RUN_FOLDERS:
            raise refuse(path, f"is a symbolic link (to {os.readlink(path)}), and the trainer "
                               "never writes through one in a run directory: remove it")
        if is_link and st.st_uid != os.geteuid():
            raise refuse(path, f"is a symbolic link (to {os.readlink(path)}) owned by another "
                               f"user (uid {st.st_uid}): only your own links to a folder are "
                               "followed; remove it or point out_dir itself elsewhere")
        if is_link and not path.exists():
            raise refuse(path, f"is a link to {os.readlink(path)}, which does not exist (a file "
                               "system that is not mounted?): mount it, or remove the link to "
                               "start without it")
        wants_dir = name in RUN_FOLDERS or name == ARCHIVE
        if path.is_dir() != wants_dir:
            raise refuse(path, f"is {'not ' if wants_dir else ''}a folder, and the trainer needs "
                               f"{'one' if wants_dir else 'a file'} there: move it away")
        if not os.access(path, os.W_OK):
            raise refuse(path, "cannot be written (a read-only mount or its permissions): make "
                               "it writable, or use another out_dir")


def remove_stale_temp_files(out_dir: Path) -> list[Path]:
    """Delete the temp files of writes that a killed run left behind (we hold the lock, so no
    write is in flight)."""
    stale = [p for folder in (out_dir, out_dir / CHECKPOINTS, out_dir / SAMPLES,
                              out_dir / POSTHOC)
             for p in sorted(folder.glob(f".*{files.TEMP_MARK}*"))]
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


def move_aside(out_dir: Path, checkpoints: list[Path], whole_run: bool,
               snapshots: list[Path] = ()) -> Path | None:
    """Move checkpoints and post-hoc snapshots (and, for a whole run, its metrics, config, grids
    and snapshots) to a new archive folder; a metrics.jsonl that stays is copied there too.
    Returns the folder, if any."""
    run_files = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    if not checkpoints and not snapshots and not (whole_run and run_files):
        return None
    dest = new_archive_dir(out_dir)
    (dest / CHECKPOINTS).mkdir()
    for path in checkpoints:
        os.replace(path, dest / CHECKPOINTS / path.name)
    if whole_run:
        for path in run_files:
            os.replace(path, dest / path.name)
        kept = ("metrics, config, grids and post-hoc snapshots"
                if out_dir / POSTHOC in run_files else "metrics, config and grids")
        log.warning("moved %d checkpoint(s) and its %s of an earlier run to %s (nothing is "
                    "deleted)", len(checkpoints), kept, dest)
        return dest
    if snapshots:
        (dest / POSTHOC).mkdir()
        for path in snapshots:
            os.replace(path, dest / POSTHOC / path.name)
    if (out_dir / METRICS).is_file():
        shutil.copy2(out_dir / METRICS, dest / METRICS)  # the resumed run truncates the live one
    log.warning("moved %d checkpoint(s) and %d post-hoc snapshot(s) newer than the resumed "
                "checkpoint to %s (nothing is deleted)", len(checkpoints), len(snapshots), dest)
    return dest
