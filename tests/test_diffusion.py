"""CFG label dropout, losses, and sampling determinism through torchmultimodal's samplers."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from conftest import TINY_MODEL
from torch import Tensor

from ddp_diffusion.config import DiffusionConfig
from ddp_diffusion.data import MemoryLoader, StepPlan
from ddp_diffusion.diffusion import Diffusion, SolverSampler, build_denoiser
from ddp_diffusion.network import NetworkOutput
from ddp_diffusion.sample import generate


def _denoiser(steps: int = 100, randomize: bool = False) -> torch.nn.Module:
    """A tiny denoiser; `randomize` replaces the zero-initialised layers (residual branches,
    prediction head) so that an untrained net's output depends on its inputs."""
    torch.manual_seed(0)
    denoiser = build_denoiser(TINY_MODEL, steps)
    if randomize:
        with torch.no_grad():
            for p in denoiser.parameters():
                if p.ndim > 1 and not p.any():
                    torch.nn.init.normal_(p, std=0.1)
            denoiser.cfguidance.model.out[-1].weight[1].zero_()  # keep the learned variance tame
    return denoiser


def test_label_dropout_fraction_in_training_and_none_in_eval() -> None:
    n = 20000
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    plan = StepPlan(n, n, seed=3, device=torch.device("cpu"))
    (batch,) = MemoryLoader(images, torch.arange(n) % 10, plan, 0, 1, 1, 1000,
                            0.1).micro_batches(0)
    assert abs(batch.drop.float().mean().item() - 0.1) < 0.01  # 20000 draws: sd 0.002

    denoiser = _denoiser()
    null = denoiser.null_embedding[0]
    emb = denoiser.condition(batch.labels, batch.drop)["context"]
    replaced = (emb == null).all(dim=1)
    assert torch.equal(replaced, batch.drop)  # exactly the drawn rows get the null embedding
    # Sampling (eval) conditions on every label: nothing is replaced.
    eval_emb = denoiser.condition(batch.labels)["context"]
    assert not (eval_emb == null).all(dim=1).any()
    assert torch.equal(eval_emb, denoiser.class_embedding(batch.labels))


def test_hybrid_loss_trains_the_variance_head_and_mse_does_not() -> None:
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([0, 10, 50, 99])
    for loss_name, expect_var_grad in (("hybrid", True), ("mse", False)):
        diffusion = Diffusion(DiffusionConfig(steps=100, loss=loss_name))
        denoiser = _denoiser()
        xt = diffusion.q_sample(x0, noise, t)
        loss = diffusion.loss(denoiser(xt, t, torch.arange(4)), x0, xt, noise, t)
        loss.backward()
        head = denoiser.cfguidance.model.out[-1].weight.grad  # conv: [prediction, variance]
        assert head[0].abs().sum() > 0
        assert (head[1].abs().sum() > 0) == expect_var_grad, loss_name


def test_same_seed_same_pixels_and_classes_differ() -> None:
    diffusion = Diffusion(DiffusionConfig(steps=100))
    denoiser = _denoiser(randomize=True)
    labels = torch.tensor([0, 7])
    for sampler in ("ddpm", "ddim", "dpm++", "sde-dpm++", "unipc"):
        a = generate(denoiser, diffusion, labels, sampler, 10, guidance=2.0, seed=5, eta=1.0)
        b = generate(denoiser, diffusion, labels, sampler, 10, guidance=2.0, seed=5, eta=1.0)
        c = generate(denoiser, diffusion, labels, sampler, 10, guidance=2.0, seed=6, eta=1.0)
        assert a.shape == (2, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
        assert torch.equal(a, b), sampler
        assert not torch.equal(a, c), sampler
        other = generate(denoiser, diffusion, torch.tensor([3, 7]), sampler, 10, 2.0, seed=5,
                         eta=1.0)
        assert not torch.allclose(a[0], other[0], atol=1e-3), sampler  # another class
    # generate() restores the caller's RNG and never changes the module's guidance.
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    generate(denoiser, diffusion, labels, "ddim", 5, guidance=2.0, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert denoiser.cfguidance.guidance == 0.0  # it samples through denoiser.guided(g)


def test_guidance_pushes_the_conditional_prediction_away_from_the_unconditional_one() -> None:
    """Classifier-free guidance g: (1 + g) * cond - g * uncond, where cond and uncond are the
    same network's predictions with the class embedding and with the learned null embedding
    (the one label dropout trains); g = 0 is the conditional prediction alone."""
    denoiser = _denoiser(randomize=True).double().eval()
    net = denoiser.cfguidance.model
    labels = torch.tensor([1, 2, 7])
    torch.manual_seed(3)
    xt, t = torch.randn(3, 1, 32, 32, dtype=torch.float64), torch.tensor([5, 40, 90])
    with torch.no_grad():
        cond = net(xt, t, denoiser.condition(labels))
        uncond = net(xt, t, denoiser.condition(labels, drop=torch.ones(3, dtype=torch.bool)))
        assert not torch.allclose(cond.prediction, uncond.prediction)  # something to push
        for g in (0.0, 0.5, 2.0):
            guided = denoiser.guided(g).eval()(xt, t, denoiser.condition(labels))
            torch.testing.assert_close(guided.prediction,
                                       (1 + g) * cond.prediction - g * uncond.prediction)
            # the learned variance is not guided: the conditional one
            torch.testing.assert_close(guided.variance_value, cond.variance_value)
    # generate() samples through the guided network: guidance changes its pixels
    diffusion = Diffusion(DiffusionConfig(steps=100))
    g0, g2 = (generate(denoiser.float(), diffusion, labels, "ddim", 10, guidance=g, seed=0)
              for g in (0.0, 2.0))
    assert not torch.allclose(g0, g2, atol=1e-3)


def test_ddim_step_is_consistent_where_the_x0_clamp_bites() -> None:
    """A DDIM step from t to t must return x_t: (x0, noise) have to explain x_t together.

    With torchmultimodal's raw noise next to the clamped x0 it does not (the bug behind DDIM
    FID getting worse with more steps); ConsistentNoisePredictor re-derives the noise.
    """
    diffusion = Diffusion(DiffusionConfig(steps=100))
    denoiser = _denoiser(randomize=True).eval()
    ddim = diffusion.sampler(denoiser, "ddim", 10, guidance=0.0)
    torch.manual_seed(1)
    xt = 2 * torch.randn(4, 1, 32, 32)
    t = torch.full((4,), 5)
    cond = denoiser.condition(torch.arange(4))
    with torch.no_grad():
        x0 = diffusion.predictor.predict_x0(denoiser.cfguidance(xt, t, cond).prediction, xt, t)
        assert (x0.abs() == 1).float().mean() > 0.1  # the clamp bites on many pixels
        same = ddim.remove_noise(xt, cond, t, t)
    torch.testing.assert_close(same, xt, rtol=0, atol=1e-4)


def reference_ddim(eps: Callable[[Tensor, int], Tensor], alphas_cumprod: Tensor,
                   timesteps: list[int], x: Tensor) -> Tensor:
    """Deterministic DDIM written from the paper (Song et al. 2021, eq. 12 with sigma = 0), as
    improved-diffusion runs it: one evaluation per timestep (largest first), x0 clamped to the
    data range and the noise re-derived from it, and the last step to alpha_bar = 1: the data."""
    for i, t in enumerate(timesteps):
        a = alphas_cumprod[t]
        a_next = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        x0 = ((x - (1 - a).sqrt() * eps(x, t)) / a.sqrt()).clamp(-1, 1)
        e = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * e
    return x


def test_ddim_matches_the_papers_equations_step_for_step_and_evaluation_for_evaluation() -> None:
    diffusion = Diffusion(DiffusionConfig(steps=100))
    denoiser = _denoiser(randomize=True).double().eval()  # float64: the two differ in rounding
    net, labels, g = denoiser.cfguidance.model, torch.tensor([0, 3, 7]), 2.0
    cond = denoiser.condition(labels)
    uncond = denoiser.condition(labels, drop=torch.ones(3, dtype=torch.bool))
    evaluated: list[Tensor] = []  # the steps of each call of the net
    hook = net.register_forward_hook(lambda _, args, __: evaluated.append(args[1]))
    torch.manual_seed(2)
    noise = torch.randn(3, 1, 32, 32, dtype=torch.float64)

    def eps(x: Tensor, t: int) -> Tensor:  # classifier-free guidance, by its definition
        steps = torch.full((len(x),), t)
        return (1 + g) * net(x, steps, cond).prediction - g * net(x, steps, uncond).prediction

    with torch.no_grad():
        ours = diffusion.sampler(denoiser, "ddim", 10, guidance=g)(noise, conditional_inputs=cond)
        hook.remove()
        # CFG batches the conditional and unconditional branch: one call per evaluation, and
        # both halves of the batch at the same step.
        assert len(evaluated) == 10 and all(len(t.unique()) == 1 for t in evaluated)
        timesteps = [t[0].item() for t in evaluated]
        expected = reference_ddim(eps, diffusion.schedule.alphas_cumprod, timesteps, noise)
    # 10 of the 100 steps, from pure noise (99) down to the data's (0), evenly: gaps of 11 or 12
    assert timesteps[0] == 99 and timesteps[-1] == 0
    assert {a - b for a, b in itertools.pairwise(timesteps)} <= {11, 12}
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)
    assert ours.abs().max() <= 1  # it ends on the clamped data estimate, not on x at t=0


def test_dpm_solver_of_first_order_is_ddim_and_agrees_with_the_papers_equations() -> None:
    """Where the methods coincide (DPM-Solver++ of order 1 is DDIM) diffusers' solver, driven
    by our schedule and guided network, follows the same trajectory as DDIM from the paper."""
    diffusion = Diffusion(DiffusionConfig(steps=100))
    denoiser = _denoiser(randomize=True).double().eval()
    guided = denoiser.guided(2.0).eval()
    cond = denoiser.condition(torch.tensor([0, 3, 7]))
    torch.manual_seed(2)
    noise = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    solver = SolverSampler(guided, "dpmsolver++", diffusion.schedule.betas, 10, clamp=True,
                           order=1)

    def eps(x: Tensor, t: int) -> Tensor:
        return guided(x, torch.full((len(x),), t), cond).prediction

    with torch.no_grad():
        ours = solver(noise, cond)
        timesteps = solver.scheduler.timesteps.tolist()
        expected = reference_ddim(eps, diffusion.schedule.alphas_cumprod, timesteps, noise)
    assert len(timesteps) == 10 and timesteps[0] == 99
    # diffusers keeps its schedule in float32: agreement to its rounding, not to float64's
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


class GaussianDenoiser(torch.nn.Module):
    """The exact noise prediction E[eps | x_t] when every pixel of the data is N(mu, s^2)."""

    def __init__(self, alphas_cumprod: Tensor, mu: float, s: float) -> None:
        super().__init__()
        self.alphas_cumprod, self.mu, self.s = alphas_cumprod, mu, s

    def forward(self, x: Tensor, t: Tensor, c: object = None) -> NetworkOutput:
        a = self.alphas_cumprod[t].view(-1, *[1] * (x.dim() - 1))
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)
        return NetworkOutput(prediction=eps)


def test_ode_samplers_converge_to_the_exact_flow_of_a_gaussian_as_steps_grow() -> None:
    """For Gaussian data the probability-flow ODE is linear: x_T maps to mu + s * x_T / std(x_T)
    (up to the tiny signal left at T). Each deterministic sampler's error to that exact image
    shrinks as steps grow; the second-order solvers' much faster than DDIM's."""
    diffusion = Diffusion(DiffusionConfig(steps=1000, beta_schedule="cosine", clamp_x0=False))
    ac = diffusion.schedule.alphas_cumprod
    mu, s = 0.3, 0.2
    model = GaussianDenoiser(ac, mu, s)
    torch.manual_seed(0)
    x_t = torch.randn(4096, 1, 1, 1, dtype=torch.float64)
    a_t = ac[-1]
    exact = mu + s * (x_t - a_t.sqrt() * mu) / (a_t * s ** 2 + 1 - a_t).sqrt()

    stand_in = _denoiser(1000)  # the network Diffusion.sampler wraps, swapped out below

    def error(kind: str, steps: int) -> float:
        sampler = diffusion.sampler(stand_in, kind, steps, guidance=0.0)
        sampler.model = model  # the sampler a run builds, evaluating the exact denoiser
        with torch.no_grad():
            return (sampler(x_t, None) - exact).abs().max().item() / s

    errors = {k: [error(k, n) for n in (5, 10, 25, 100)] for k in ("ddim", "dpm++", "unipc")}
    for kind, e in errors.items():
        assert all(a > b for a, b in itertools.pairwise(e)), (kind, e)  # falls with steps
        assert e[-1] < 0.15, (kind, e)  # 100 steps: close to the exact sample
    # The order of each method, from 25 to 100 steps (4x): first order cuts the error ~4x,
    # second order ~16x.
    assert 3 < errors["ddim"][2] / errors["ddim"][3] < 6, errors
    for kind in ("dpm++", "unipc"):
        assert errors[kind][2] / errors[kind][3] > 8, errors
        assert errors[kind][3] < errors["ddim"][3] / 4, errors


def test_the_sde_solver_converges_to_the_gaussian_whose_exact_denoiser_it_is_given() -> None:
    diffusion = Diffusion(DiffusionConfig(steps=1000, beta_schedule="cosine", clamp_x0=False))
    mu, s = 0.3, 0.2
    model = GaussianDenoiser(diffusion.schedule.alphas_cumprod, mu, s)

    def sample(steps: int) -> Tensor:
        sampler = SolverSampler(model, "sde-dpmsolver++", diffusion.schedule.betas, steps,
                                clamp=False)
        torch.manual_seed(0)
        with torch.no_grad():
            return sampler(torch.randn(20000, 1, 1, 1, dtype=torch.float64), None)

    # 20,000 draws: the standard errors are 0.7% of s for the mean and 0.5% for the spread
    few, many = sample(10), sample(100)
    assert abs(few.std().item() / s - 1) > 0.1  # 10 steps: visibly too narrow
    assert abs(many.mean().item() - mu) < 0.05 * s
    assert abs(many.std().item() / s - 1) < 0.03


def test_deterministic_samplers_treat_each_image_on_its_own() -> None:
    """An image depends only on its own starting noise: sampling a batch in one go or in chunks
    gives the same pixels, whatever chunks ranks and FID draw."""
    diffusion = Diffusion(DiffusionConfig(steps=100))
    denoiser = _denoiser(randomize=True).double().eval()
    cond = denoiser.condition(torch.tensor([0, 3, 7, 9]))
    torch.manual_seed(4)
    noise = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    for kind in ("ddim", "dpm++", "unipc"):
        sampler = diffusion.sampler(denoiser, kind, 8, guidance=2.0)
        with torch.no_grad():
            whole = sampler(noise, conditional_inputs=cond)
            parts = [sampler(noise[i:i + 2], conditional_inputs={k: v[i:i + 2]
                                                                 for k, v in cond.items()})
                     for i in (0, 2)]
        torch.testing.assert_close(whole, torch.cat(parts), rtol=0, atol=1e-9, msg=kind)


def torchmultimodal_lookups(cfg: DiffusionConfig) -> Diffusion:
    """A Diffusion whose schedule reads go through torchmultimodal's own lookup (the one that
    asks the device whether any step is fractional), as before the direct reads."""
    from torchmultimodal.diffusion_labs.modules.losses.diffusion_hybrid_loss import (
        DiffusionHybridLoss,
    )
    from torchmultimodal.diffusion_labs.schedules.discrete_gaussian_schedule import (
        DiscreteGaussianSchedule,
    )

    old = Diffusion(cfg)
    old.schedule = DiscreteGaussianSchedule(old.schedule.betas)
    old.predictor = type(old.predictor)(old.schedule, old.predictor.clamp_func)
    old.hybrid = DiffusionHybridLoss(old.schedule)
    return old


def test_direct_schedule_reads_equal_torchmultimodal_lookups_in_float64() -> None:
    """Loss, forward noising, posterior and every sampler: the same numbers, bit for bit."""
    cfg = DiffusionConfig(steps=100, loss="hybrid")
    new, old = Diffusion(cfg), torchmultimodal_lookups(cfg)
    assert type(new.schedule) is not type(old.schedule)
    torch.manual_seed(0)
    x0, noise, pred, value = (torch.randn(6, 1, 8, 8, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0, 1, 17, 50, 98, 99])
    out = NetworkOutput(prediction=pred, variance_value=value.sigmoid())
    xt = new.q_sample(x0, noise, t)
    assert torch.equal(xt, old.q_sample(x0, noise, t))
    assert torch.equal(new.loss(out, x0, xt, noise, t), old.loss(out, x0, xt, noise, t))
    for a, b in zip(new.schedule.q_posterior(x0, xt, t, value),
                    old.schedule.q_posterior(x0, xt, t, value), strict=True):
        assert torch.equal(a, b)

    denoiser = _denoiser(randomize=True).double().eval()
    cond = denoiser.condition(torch.tensor([0, 3, 7]))
    start = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for kind in ("ddpm", "ddim", "dpm++", "sde-dpm++", "unipc"):
            images = []
            for diffusion in (new, old):
                torch.manual_seed(1)  # the stochastic samplers draw from the global RNG
                images.append(diffusion.sampler(denoiser, kind, 10, guidance=2.0)(
                    start, conditional_inputs=cond))
            assert torch.equal(*images), kind
