"""Non-finite steps: skipped on the device every step, reported by the host at sync points.

A step whose loss or gradient norm is not finite must change nothing: not the weights, the
optimizer moments or the EMA. Reading that flag back every step would make the host wait for
the GPU once per step, so the decision stays on the device: every rank's flag is combined by an
all-reduce (asynchronous on NCCL), the fused AdamW skips the update through its `found_inf`
input, and the EMA moves by a weight of zero. The host reads the flags of all steps since the
last sync point in one transfer and replays them in order, so the warnings, the streak and the
abort are exactly those a per-step check gives, only reported a few steps later.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ddp_diffusion import distributed

log = logging.getLogger("ddp_diffusion")


class NonFiniteSteps:
    """Per-step skip flags on the device, and the streak and total the host knows of."""

    def __init__(self, device: torch.device, capacity: int, total: int = 0) -> None:
        self.flags = torch.zeros(capacity, dtype=torch.uint8, device=device)
        self.pending = 0  # steps recorded since the last read
        self.streak, self.total = 0, total

    def record(self, loss: Tensor, grad_norm: Tensor, loss_scaling: bool) -> Tensor:
        """This step's skip flag (a bool on the device, the same on every rank), recorded.

        Skipped: a non-finite loss or gradient norm on any rank. Counted as non-finite (towards
        the streak and the abort): the same, except that with fp16 loss scaling an overflowing
        gradient is routine (the scaler lowers its scale), so only the loss counts there."""
        finite_loss, finite_norm = torch.isfinite(loss), torch.isfinite(grad_norm)
        flags = torch.stack([~(finite_loss & finite_norm),
                             ~finite_loss | (~finite_norm & (not loss_scaling))]).to(torch.uint8)
        distributed.max_across_ranks(flags)
        self.flags[self.pending] = flags[1]
        self.pending += 1
        return flags[0].bool()

    def read(self, last_step: int, max_streak: int) -> int | None:
        """Replay the steps recorded since the last read (the newest is `last_step`): warn for
        each non-finite one; the step whose streak reached `max_streak`, if one did."""
        counted = self.flags[:self.pending].tolist()  # the one host sync
        first = last_step - self.pending + 1
        self.pending = 0
        for step, bad in enumerate(counted, start=first):
            if not bad:
                self.streak = 0
                continue
            self.streak += 1
            self.total += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, "
                        "%d total)", step, self.streak, self.total)
            if self.streak >= max_streak:
                return step
        return None
