"""The errors a user sees as one line, and the exit code of each.

The CLI prints ``error: <message>`` for any of these and exits with its code; nothing else in
the package decides exit codes.
"""

from __future__ import annotations

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


ERRORS = {cls.__name__: cls for cls in (UserError, TrainingDiverged, WriteFailed)}
