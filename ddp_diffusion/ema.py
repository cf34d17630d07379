"""Exponential moving average of the weights, with EDM's half-life in images and ramp-up.

After every optimizer step that consumed ``batch`` images, with ``nimg`` images seen so far
(this step included)::

    halflife = min(halflife_kimg * 1000, rampup_ratio * nimg)     # images
    beta     = 0.5 ** (batch / halflife)
    ema      = beta * ema + (1 - beta) * weights

so the EMA forgets half of its past every ``halflife`` images, and early in training the
half-life is a fixed fraction of the run so far (the EMA is never dominated by the random init).
``rampup_ratio = 0`` turns the ramp-up off. The EMA is kept in fp32 whatever the precision.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(batch: int, nimg: int, halflife_kimg: float, rampup_ratio: float) -> float:
    """Decay factor for one update; a pure function of the images seen."""
    halflife = halflife_kimg * 1000.0
    if rampup_ratio > 0:
        halflife = min(halflife, rampup_ratio * nimg)
    return 0.5 ** (batch / max(halflife, 1e-8))


class EMA:
    """An fp32 copy of a module whose parameters track the live ones."""

    def __init__(self, model: nn.Module) -> None:
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, beta: float, skip: torch.Tensor) -> None:
        """ema <- beta * ema + (1 - beta) * model, for every parameter (buffers are copied);
        where `skip` (a bool on the device) is set nothing moves, and the host never reads it."""
        ema_params = list(self.module.parameters())
        deltas = torch._foreach_sub([p.detach().float() for p in model.parameters()], ema_params)
        torch._foreach_mul_(deltas, (1.0 - beta) * (~skip).float())
        torch._foreach_add_(ema_params, deltas)
        for eb, b in zip(self.module.buffers(), model.buffers(), strict=True):
            eb.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
