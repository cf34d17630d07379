"""EMA: the update formula against a hand computation, and its half-life semantics."""

from __future__ import annotations

import pytest
import torch

from ddp_diffusion.ema import EMA, ema_beta


def test_ema_matches_hand_computed_average() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model)
    batch, halflife_kimg, rampup = 10, 0.02, 0.0  # half-life 20 images: beta = 0.5 ** 0.5
    expected = 1.0
    for step, w in enumerate([3.0, -1.0, 5.0, 2.0], start=1):
        with torch.no_grad():
            model.weight.fill_(w)
        beta = ema_beta(batch, step * batch, halflife_kimg, rampup)
        assert beta == pytest.approx(0.5 ** 0.5)
        ema.update(model, beta, skip=torch.tensor(False))
        expected = beta * expected + (1 - beta) * w
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    # Closed form after four updates with a constant beta.
    b = 0.5 ** 0.5
    closed = b ** 4 * 1.0 + (1 - b) * (b ** 3 * 3 + b ** 2 * -1 + b * 5 + 2)
    assert ema.module.weight.item() == pytest.approx(closed, rel=1e-6)
    assert ema.module.weight.dtype == torch.float32 and not ema.module.weight.requires_grad


def test_a_skipped_step_leaves_the_ema_exactly_as_it_was() -> None:
    model = torch.nn.Linear(3, 1)
    ema = EMA(model)
    ema.update(model, 0.9, skip=torch.tensor(False))
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        model.weight.add_(100.0)
    ema.update(model, 0.5, skip=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.module.parameters(), strict=True))
    ema.update(model, 0.5, skip=torch.tensor(False))  # and the next step moves it again
    assert not torch.equal(before[0], ema.module.weight)


def test_halflife_and_rampup() -> None:
    # Half of the EMA is forgotten after `halflife` images, whatever the batch size.
    assert ema_beta(100, 10**6, 10.0, 0.0) ** 100 == pytest.approx(0.5)
    assert ema_beta(50, 10**6, 10.0, 0.0) ** 200 == pytest.approx(0.5)
    # Early on the ramp-up caps the half-life at rampup_ratio * images seen.
    assert ema_beta(100, 1000, 10.0, 0.05) == pytest.approx(0.5 ** (100 / 50))
