"""Metrics on rank 0: out_dir/metrics.jsonl always, Weights & Biases when enabled.

W&B runs offline by default (no account, no network; upload later with ``wandb sync``). The run
id lives in every checkpoint, so a resumed or requeued run continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddp_diffusion import files, rundir
from ddp_diffusion.config import Config, to_dict
from ddp_diffusion.errors import UserError, WriteFailed

log = logging.getLogger("ddp_diffusion")


def new_run_id() -> str:
    """A fresh W&B-compatible run id (8 lowercase alphanumerics)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(8))


def metrics_kept(path: Path, last_step: int) -> str | None:
    """metrics.jsonl without the records logged after `last_step` (work lost by a crash that a
    resume redoes); None if there is no such file. Only reads: the caller writes it back.

    A torn last line (a crash mid-write) is dropped with a warning; a bad line elsewhere is an
    error naming it.
    """
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n < len(lines):
                raise UserError(f"{path} line {n} is not a JSON record ({line[:40]!r}); fix or "
                                "delete that line") from None
            log.warning("%s: dropping its torn last line (a run stopped while writing it): "
                        "%r", path, line[:80])
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    return "".join(line + "\n" for line in kept)


class Tracker:
    """Writes metrics.jsonl and mirrors it to W&B; a no-op on ranks other than 0."""

    def __init__(self, cfg: Config, run_id: str, active: bool) -> None:
        """Start W&B (rank 0); metrics.jsonl is not touched until `log`."""
        self.active = active
        self.run_id = run_id
        self.run: Any = None
        self.metrics_path = Path(cfg.out_dir) / rundir.METRICS
        if active and cfg.tracking.wandb != "disabled":
            import wandb  # imported lazily: it costs ~1 s and rank>0 never needs it

            os.environ.setdefault("WANDB_SILENT", "true")
            try:
                self.run = wandb.init(
                    project=cfg.tracking.project, entity=cfg.tracking.entity,
                    name=cfg.tracking.name, group=cfg.tracking.group,
                    tags=cfg.tracking.tags or None,
                    config=to_dict(cfg), id=run_id, resume="allow", mode=cfg.tracking.wandb,
                    dir=str(Path(cfg.out_dir).resolve()),
                    settings=wandb.Settings(console="off"),
                )
            except Exception as e:  # W&B raises many types (UsageError, CommError, ...)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise UserError(
                    f"W&B could not start ({type(e).__name__}: {first}): run `wandb login` or "
                    "set WANDB_API_KEY, or use tracking.wandb=offline (sync later) or "
                    "tracking.wandb=disabled") from None

    @property
    def wandb_dir(self) -> str | None:
        """The local W&B run folder (offline runs: sync it with `wandb sync`)."""
        return self.run.dir.removesuffix("/files") if self.run is not None else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one record {step, **metrics} to metrics.jsonl and W&B."""
        if not self.active:
            return
        try:
            files.append_text(self.metrics_path, json.dumps({"step": step, **metrics}) + "\n")
        except WriteFailed as e:
            raise WriteFailed(f"{e}; the newest checkpoint is intact: fix that and run the same "
                              "command again") from None
        self._wandb(lambda run: run.log(metrics, step=step))

    def log_image(self, step: int, key: str, path: Path) -> None:
        """Log a PNG (e.g. a sample grid) to W&B."""
        if self.run is not None:
            import wandb

            self._wandb(lambda run: run.log({key: wandb.Image(str(path))}, step=step))

    def finish(self) -> None:
        self._wandb(lambda run: run.finish())
        self.run = None

    def _wandb(self, call: Callable[[Any], object]) -> None:
        """Call W&B; if its service died, warn once and go on with metrics.jsonl only.

        A stop signal reaches every process of a SLURM job step, W&B's service too (SIGTERM
        ends it): training must still save its checkpoint, and a resume continues the W&B run.
        """
        if self.run is None:
            return
        try:
            call(self.run)
        except Exception as e:
            log.warning("W&B stopped working (%s: %s), e.g. its service got the stop signal; "
                        "metrics go on in %s, and a resume continues W&B run %s",
                        type(e).__name__, e, self.metrics_path, self.run_id)
            self.run = None
