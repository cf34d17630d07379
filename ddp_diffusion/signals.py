"""Stop signals: what the trainer does with SIGTERM, SIGINT, SIGUSR1 and SIGUSR2.

Kept free of torch so that the CLI installs the handlers before its slow imports: a signal that
arrives while a process starts up is then a request to stop, not a death.
"""

from __future__ import annotations

import signal
from types import FrameType

# SIGINT is Ctrl-C: a first one stops like SIGTERM (save, exit 75), a second exits at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def ignore_stop_signals() -> None:
    """Ignore stop signals from now on, for a process that is about to exit.

    Interpreter shutdown resets a Python handler to the default action, which kills: torchrun's
    SIGTERM to the other ranks, sent when the first exits with 75, would then turn a clean exit
    75 into a death by signal. An ignored signal stays ignored.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def loader_worker_init(worker_id: int) -> None:
    """A DataLoader worker ignores stop signals: SLURM (scancel, preemption, time limit) and
    Ctrl-C signal every process of the job, workers included, and a worker that died of it
    would fail the trainer's next step before it could save. The worker still ends when its
    loader shuts down, or when the trainer exits (torch's worker watchdog)."""
    ignore_stop_signals()


class StopRequest:
    """Remembers SIGTERM/SIGINT/SIGUSR1/SIGUSR2 so the trainer finishes its step, saves and
    exits; a second Ctrl-C raises KeyboardInterrupt at once (nothing more is saved).

    The handlers stay installed until the process exits: torchrun sends SIGTERM to the other
    ranks as soon as one exits with 75, and a rank still leaving the process group must not
    die of it.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None
