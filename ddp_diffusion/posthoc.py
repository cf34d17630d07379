"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3): EMAs of any length chosen after training, from snapshots of two.

A power-function EMA of exponent gamma, updated after optimizer step t = 1, 2, ... with::

    beta_t = (1 - 1/t) ** (gamma + 1)
    ema_t  = beta_t * ema_{t-1} + (1 - beta_t) * weights_t

averages the weights of steps 1..t with weights (tau**(gamma+1) - (tau-1)**(gamma+1)) /
t**(gamma+1): the integral over (tau-1, tau] of the profile p(tau) = (gamma+1) tau**gamma /
t**(gamma+1) on [0, t]. The profile's standard deviation relative to t is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))

so a length is named by sigma_rel whatever the run's length. Snapshots of such EMAs (gamma_i at
step t_i) are combined into the EMA of another (sigma_rel, t) by least squares on the profiles:
A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_target> (L2 inner products, in closed form),
then the weights are sum_i x_i snapshot_i.

Pure arithmetic on the host; torch is imported only to combine weights (`reconstruct`), so the
config can check sigma_rel without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# sigma_rel of gamma = 0 (the uniform average of every step so far): the longest EMA whose
# profile does not grow toward the start of training (gamma < 0 weighs the first steps most).
SIGMA_REL_MAX = math.sqrt(1 / 12)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power profile of exponent gamma."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has this relative std (0 < sigma_rel <= 1/sqrt(12));
    sigma_rel falls strictly as gamma grows, so bisection finds it to float precision."""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel={sigma_rel} must be in (0, {SIGMA_REL_MAX:.4f}]")
    low, high = 0.0, 1.0
    while gamma_to_sigma_rel(high) > sigma_rel:
        low, high = high, 2 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        low, high = (mid, high) if gamma_to_sigma_rel(mid) > sigma_rel else (low, mid)
    return 0.5 * (low + high)


def power_beta(step: int, gamma: float) -> float:
    """The decay of the update after optimizer step `step` (1, 2, ...): (1 - 1/step)**(gamma+1)."""
    if step < 1:
        raise ValueError(f"step={step} must be >= 1")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def step_weights(step: int, gamma: float) -> list[float]:
    """The weight of each step 1..`step` in the EMA after `step`: the profile's integral over
    (tau-1, tau]."""
    return [(tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / step ** (gamma + 1)
            for tau in range(1, step + 1)]


def profile_inner(gamma_i: float, t_i: float, gamma_j: float, t_j: float) -> float:
    """<p_i, p_j>, the integral over [0, min(t_i, t_j)] of the product of two power profiles
    (in logarithms: large gammas and steps would overflow)."""
    g = gamma_i + gamma_j + 1
    log = (math.log((gamma_i + 1) * (gamma_j + 1) / g) + g * math.log(min(t_i, t_j))
           - (gamma_i + 1) * math.log(t_i) - (gamma_j + 1) * math.log(t_j))
    return math.exp(log)


def solve_coefficients(snapshots: Sequence[tuple[float, int]], sigma_rel: float, step: int
                       ) -> list[float]:
    """The x_i for which sum_i x_i p_i is the least-squares fit of the profile of (sigma_rel,
    step), from the snapshots' (gamma_i, t_i); minimum-norm where A is singular (duplicates)."""
    import numpy as np

    gamma = sigma_rel_to_gamma(sigma_rel)
    a = np.array([[profile_inner(gi, ti, gj, tj) for gj, tj in snapshots]
                  for gi, ti in snapshots], dtype=np.float64)
    b = np.array([profile_inner(gi, ti, gamma, step) for gi, ti in snapshots], dtype=np.float64)
    return np.linalg.lstsq(a, b, rcond=None)[0].tolist()


def fit_error(snapshots: Sequence[tuple[float, int]], coefficients: Sequence[float],
              sigma_rel: float, step: int) -> float:
    """||sum_i x_i p_i - p_target|| / ||p_target||: how far the combination's profile is from
    the one asked for (0: exact)."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    pairs = list(zip(coefficients, snapshots, strict=True))
    fit = sum(xi * xj * profile_inner(gi, ti, gj, tj)
              for xi, (gi, ti) in pairs for xj, (gj, tj) in pairs)
    cross = sum(x * profile_inner(g, t, gamma, step) for x, (g, t) in pairs)
    target = profile_inner(gamma, step, gamma, step)
    return math.sqrt(max(fit - 2 * cross + target, 0.0) / target)


def reconstruct(state_dicts: Iterable[dict[str, torch.Tensor]], coefficients: Sequence[float]
                ) -> dict[str, torch.Tensor]:
    """sum_i x_i state_dict_i, summed in float64 one state dict at a time (they may stream from
    files) and returned in each tensor's dtype; a tensor equal in all of them (a buffer) is kept
    as it is, and one that is not a float is taken from the first."""
    import torch

    total: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    same: dict[str, bool] = {}
    count = 0
    for x, state in zip(coefficients, state_dicts, strict=True):
        count += 1
        for key, value in state.items():
            if key not in first:
                first[key], same[key] = value, True
                total[key] = torch.zeros(value.shape, dtype=torch.float64)
            elif same[key]:
                same[key] = torch.equal(value, first[key])
            if value.is_floating_point():
                total[key] += x * value.detach().to("cpu", torch.float64)
    if not count:
        raise ValueError("no state dicts to combine")
    return {key: first[key].clone() if same[key] or not first[key].is_floating_point()
            else total[key].to(first[key].dtype) for key in first}
