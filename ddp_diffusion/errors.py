"""The errors of the package: those a user sees as one line with their exit code, and the few
that code catches or that end a SLURM job.

The CLI prints ``error: <message>`` for any DDPDiffusionError and exits with its code; nothing
else in the package decides exit codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_IO_ERROR = 74  # EX_IOERR: a checkpoint or metrics record could not be written
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; run again to continue
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C twice (or once outside training), nothing saved


class DDPDiffusionError(Exception):
    """An error reported as one line (no traceback), with its exit code."""

    exit_code = 1


class UserError(DDPDiffusionError):
    """A mistake the user can fix: bad config, bad flag, missing file, a run dir in use."""

    exit_code = EXIT_USER_ERROR


class TrainingDiverged(DDPDiffusionError):
    """The loss or the weights became non-finite and training cannot go on."""

    exit_code = EXIT_DIVERGED


class WriteFailed(DDPDiffusionError):
    """A checkpoint or a metrics record could not be written (disk full, I/O error)."""

    exit_code = EXIT_IO_ERROR


def error_class(name: str) -> type[DDPDiffusionError]:
    """The DDPDiffusionError subclass called `name`, defined in any imported module: another
    rank's error is raised again from its name and message only (distributed.run_on_main)."""
    todo = [DDPDiffusionError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    raise KeyError(name)


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message names the file and why.

    Not a DDPDiffusionError: its callers decide whether it is the user's error (a named
    checkpoint), a reason to try an older file, or a bench's failed run.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


class CheckpointGone(CheckpointError):
    """A checkpoint that was deleted after it was listed (a run pruning its old files)."""


class RequeueLimitReached(RuntimeError):
    """The job was stopped again after requeueing itself `max_requeues` times.

    Raised in the SLURM job, not through the CLI: submitit records it with its traceback as the
    task's failed result and the task exits with status 1 (an uncaught exception).
    """
