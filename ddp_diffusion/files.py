"""Writing files where others may write too: never through a symbolic link, and whole or not at
all.

A run directory is often shared (a group's scratch space), so anyone who can write it could plant
``metrics.jsonl -> ~victim/.bashrc``. Every file the trainer writes there is therefore created
with ``O_NOFOLLOW`` (a planted link fails, its target is never opened), and every file that is
replaced is written to a fresh temp file beside it (``O_EXCL``), fsynced and renamed over it: a
rename replaces a link itself, never what it points to, and the old file stays whole until the
new one is.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ddp_diffusion.errors import UserError, WriteFailed

TEMP_MARK = ".tmp-"  # temp files are ".<name>.tmp-<pid>"; a killed writer's are removed at start


def temp_path(path: Path) -> Path:
    """The temp file a write of `path` by this process goes through."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def reason(e: BaseException) -> str:
    """Why a write failed, in words (a planted link's ELOOP named as what it is)."""
    while e is not None and not (isinstance(e, OSError) and e.strerror):
        e = e.__cause__ or e.__context__  # torch.save wraps ENOSPC in a RuntimeError
    if e is None:
        return "write failed"
    if e.errno == errno.ELOOP:
        return "it is a symbolic link, and nothing is written through one in a run directory"
    return e.strerror


def free_mib(folder: Path) -> float:
    """Free space in a folder, in MiB (0 when it cannot be asked)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0.0
    return st.f_bavail * st.f_frsize / 2**20


def _fail(path: Path, e: BaseException) -> WriteFailed:
    return WriteFailed(f"could not write {path} ({reason(e)}; {free_mib(path.parent):.1f} MiB "
                       "free there)")


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Replace `path` whole: `write` fills a fresh temp file beside it, which is flushed, fsynced
    and renamed over `path`; then the folder is fsynced. On failure (a full disk, an I/O error, a
    read-only mount) the temp file is removed, what `path` held is untouched, and WriteFailed
    says why."""
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # a link planted at our temp name is removed, not followed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:
        raise _fail(path, e) from None
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`write_atomic` of a UTF-8 text."""
    return write_atomic(path, lambda f: f.write(text.encode()))


def check_writable(path: Path, flag: str) -> None:
    """Raise UserError unless a file can be created at `path` (its folder is made if missing):
    checked before the work whose result goes there, which a late failure would throw away."""
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file where a folder of the path should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        # A real file, as the final write makes one: a read-only mount, a full inode table or a
        # folder without write permission all fail here, and os.access misses some of them.
        tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-").close()
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written ({e.strerror or e}); choose another "
                        "path") from None


def append_text(path: Path, text: str) -> None:
    """Append to `path` (created if missing), never through a symbolic link; WriteFailed if it
    cannot be."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise _fail(path, e) from None
