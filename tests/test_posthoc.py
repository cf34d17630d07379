"""Post-hoc EMA (EDM2): the power-function EMA against its averaging profile, reconstruction from
snapshots against EMAs tracked directly."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ddp_diffusion import posthoc
from ddp_diffusion.ema import EMA

# ------------------------------------------------------------------------------------ the math


def test_sigma_rel_and_gamma_are_the_papers() -> None:
    # EDM2 (section 3) tracks sigma_rel 0.05 and 0.10, i.e. gamma 16.97 and 6.94.
    assert posthoc.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert posthoc.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert posthoc.sigma_rel_to_gamma(posthoc.SIGMA_REL_MAX) == pytest.approx(0, abs=1e-9)
    for s in (1e-3, 0.01, 0.05, 0.137, 0.2, 0.28):
        assert posthoc.gamma_to_sigma_rel(posthoc.sigma_rel_to_gamma(s)) == pytest.approx(
            s, rel=1e-12)
    for bad in (0.0, -0.1, 0.29, math.nan):
        with pytest.raises(ValueError):
            posthoc.sigma_rel_to_gamma(bad)


def test_a_power_ema_is_the_average_of_its_profile() -> None:
    """Run step by step in float64, the EMA is sum_tau w_tau x_tau with w_tau the integral of
    p(tau) = (gamma+1) tau^gamma / t^(gamma+1) over (tau-1, tau]; its spread is sigma_rel."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    for sigma_rel in (0.05, 0.10, 0.25):
        gamma = posthoc.sigma_rel_to_gamma(sigma_rel)
        ema = 1234.0  # beta_1 = 0: the start is forgotten at the first step
        for t, value in enumerate(x, start=1):
            beta = posthoc.power_beta(t, gamma)
            ema = beta * ema + (1 - beta) * value
            if t in (1, 7, 100, 400):
                w = posthoc.step_weights(t, gamma)
                assert ema == pytest.approx(float(np.dot(w, x[:t])), rel=1e-12, abs=1e-12)
        # the step weights are the profile's integral over each step (a fine midpoint rule)
        t = len(x)
        for tau in (1, 200, 400):
            s = np.linspace(tau - 1, tau, 20001)[:-1] + 0.5 / 20000
            p = (gamma + 1) * s**gamma / t ** (gamma + 1)
            assert posthoc.step_weights(t, gamma)[tau - 1] == pytest.approx(p.mean(), rel=1e-6)
        w = np.array(posthoc.step_weights(10000, gamma))
        taus = np.arange(1, 10001) - 0.5
        mean = (w * taus).sum()
        assert math.sqrt((w * (taus - mean) ** 2).sum()) / 10000 == pytest.approx(sigma_rel,
                                                                                  rel=1e-3)


def test_profile_inner_products_are_the_integrals() -> None:
    for (gi, ti), (gj, tj) in [((6.94, 300), (16.97, 1000)), ((0.0, 50), (3.0, 50)),
                               ((16.97, 1000), (6.94, 300))]:
        s = np.linspace(0, min(ti, tj), 400001)[:-1] + min(ti, tj) / 800000
        pi = (gi + 1) * s**gi / ti ** (gi + 1)
        pj = (gj + 1) * s**gj / tj ** (gj + 1)
        assert posthoc.profile_inner(gi, ti, gj, tj) == pytest.approx(
            (pi * pj).mean() * min(ti, tj), rel=1e-6)
    # large gammas and steps do not overflow
    assert math.isfinite(posthoc.profile_inner(5000.0, 10**7, 5000.0, 10**7))


T, EVERY, TRACKED = 1000, 50, (0.05, 0.10, 0.07)


@pytest.fixture(scope="module")
def tracked() -> tuple[list[tuple[float, int]], list[dict], list[EMA]]:
    """EMAs (ema.EMA, fp32, as training keeps them) of sigma_rel 0.05, 0.10 and 0.07 of weights
    that drift and jitter over T steps; snapshots of the first two every EVERY steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4096, 1, bias=False)
    gammas = [posthoc.sigma_rel_to_gamma(s) for s in TRACKED]
    emas = [EMA(model) for _ in TRACKED]
    pairs, states = [], []
    walk = torch.zeros(4096)
    for t in range(1, T + 1):
        walk += 0.01 * torch.randn(4096)
        with torch.no_grad():
            model.weight.copy_(walk + 0.1 * torch.randn(4096))
        for gamma, ema in zip(gammas, emas, strict=True):
            ema.update(model, posthoc.power_beta(t, gamma), torch.tensor(False))
        if t % EVERY == 0:
            for i in (0, 1):
                pairs.append((gammas[i], t))
                states.append(copy.deepcopy(emas[i].state_dict()))
    return pairs, states, emas


def test_a_tracked_length_is_reconstructed_as_its_own_snapshot(tracked) -> None:
    pairs, states, emas = tracked
    for i, sigma_rel in enumerate(TRACKED[:2]):
        x = posthoc.solve_coefficients(pairs, sigma_rel, T)
        k = len(pairs) - 2 + i  # the snapshot of that length at step T
        one_hot = np.eye(len(pairs))[k]
        assert np.abs(np.array(x) - one_hot).max() < 1e-9
        assert posthoc.fit_error(pairs, x, sigma_rel, T) < 1e-6
        weights = posthoc.reconstruct(states, x)["weight"]
        torch.testing.assert_close(weights, emas[i].module.weight, rtol=1e-6, atol=1e-7)
    # and at an earlier snapshot's step, from the snapshots up to it
    x = posthoc.solve_coefficients(pairs[:10], 0.05, 5 * EVERY)
    assert np.abs(np.array(x) - np.eye(10)[8]).max() < 1e-9


def test_an_intermediate_length_matches_an_ema_tracked_at_it(tracked) -> None:
    """0.07 reconstructed from the 0.05 and 0.10 snapshots is ~500x closer to the EMA tracked
    at 0.07 than either input (measured: 8.9e-5 relative, against 0.051 and 0.069)."""
    pairs, states, emas = tracked
    target = emas[2].module.weight

    def error(w: torch.Tensor) -> float:
        return ((w - target).norm() / target.norm()).item()

    x = posthoc.solve_coefficients(pairs, 0.07, T)
    reconstructed = error(posthoc.reconstruct(states, x)["weight"])
    inputs = min(error(emas[0].module.weight), error(emas[1].module.weight))
    assert inputs > 0.03
    assert reconstructed < inputs / 50, (reconstructed, inputs)
    # the profile fit says so too: the combination's profile is within 1% of the target's,
    # either input alone is far
    assert posthoc.fit_error(pairs, x, 0.07, T) < 0.01
    assert min(posthoc.fit_error([p], [1.0], 0.07, T) for p in pairs[-2:]) > 0.2


def test_reconstruct_keeps_equal_buffers_and_the_dtype() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "buf": torch.tensor([0.3]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "buf": torch.tensor([0.3]), "n": torch.tensor(3)}
    out = posthoc.reconstruct(iter([a, b]), [0.7, 0.31])  # weights of sum 1.01
    assert torch.equal(out["buf"], a["buf"]) and torch.equal(out["n"], a["n"])
    torch.testing.assert_close(out["w"], torch.tensor([0.7 + 0.93, 1.4 + 1.86]))
    assert out["w"].dtype == torch.float32
