"""The only door to torchmultimodal.diffusion_labs: schedule, predictor, CFG, losses, samplers.

torchmultimodal-nightly is unmaintained, so every import of it lives here; replacing it means
rewriting this module alone.

Classifier-free guidance convention (torchmultimodal's CFGuidance): the guided prediction is
``(1 + g) * cond - g * uncond``, so ``g = 0`` means *no* guidance (plain conditional sampling),
and the code-along's ``g = 2`` weighs the conditional prediction three times.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torchmultimodal.diffusion_labs.modules.adapters.cfguidance import CFGuidance
from torchmultimodal.diffusion_labs.modules.losses.diffusion_hybrid_loss import (
    DiffusionHybridLoss,
)
from torchmultimodal.diffusion_labs.predictors.noise_predictor import NoisePredictor
from torchmultimodal.diffusion_labs.samplers.ddim import DDIModule
from torchmultimodal.diffusion_labs.samplers.ddpm import DDPModule
from torchmultimodal.diffusion_labs.schedules.discrete_gaussian_schedule import (
    DiscreteGaussianSchedule,
    cosine_beta_schedule,
    linear_beta_schedule,
)

from ddp_diffusion.config import DiffusionConfig, ModelConfig
from ddp_diffusion.network import COND_KEY, DROPOUT_KEYS, Network, NetworkOutput
from ddp_diffusion.registry import MODELS, SAMPLERS


def clamp_unit(x: Tensor) -> Tensor:
    """Clamp predicted x0 to the data range [-1, 1]."""
    return x.clamp(-1.0, 1.0)


class DeviceSchedule(DiscreteGaussianSchedule):
    """torchmultimodal's schedule, read without making the host wait for the device.

    Its lookup asks `(t != t.floor()).any()` on every read, to interpolate fractional steps: a
    host read of a device tensor, about 12 per training step with the hybrid loss, each one a
    full pipeline drain on a GPU. Integer steps, all that training and our samplers use, index
    the table directly here (the same values as its gather, bit for bit; each table moves to
    the device once); fractional steps still interpolate as before.
    """

    def __call__(self, var_name: str, t: Tensor, shape: torch.Size | Tensor) -> Tensor:
        if t.is_floating_point():
            return super().__call__(var_name, t, shape)
        table = getattr(self, var_name)
        if table.device != t.device:
            table = table.to(t.device)
            setattr(self, var_name, table)
        return table[t].reshape(t.numel(), *((1,) * (len(shape) - 1)))


class ConsistentNoisePredictor(NoisePredictor):
    """NoisePredictor whose noise estimate agrees with the clamped x0, as improved-diffusion does.

    torchmultimodal's DDIM step combines the clamped x0 with the raw predicted noise. Where the
    clamp bites the two disagree, and the error compounds over steps: with the raw noise, FID
    got worse as DDIM steps increased (14.6 at 10 steps, 20.3 at 100; docs/evaluation.md).
    Re-deriving the noise from the clamped x0 makes every DDIM step consistent: a step from t to
    t returns x_t unchanged. DDPM uses x0 only, so it is unaffected.
    """

    def predict_noise(self, prediction: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        if self.clamp_func is None:
            return prediction
        x0 = self.predict_x0(prediction, xt, t)
        x_coef = self.schedule("sqrt_recip_alphas_cumprod", t, xt.shape)
        e_coef = self.schedule("sqrt_recip_alphas_cumprod_minus_one", t, xt.shape)
        return ((x_coef * xt - x0) / e_coef).to(xt.dtype)


class DDIMToData(DDIModule):
    """torchmultimodal's DDIM, ending on the data as the DDIM paper and improved-diffusion do.

    Its own generator stops at x at the smallest eval step: one model evaluation short of the
    steps asked for, with that step's noise left in the image. The last step here goes on to
    alpha_bar = 1, that is the clamped x0 prediction (a cross-check against the paper's equations
    in tests/test_diffusion.py found the difference).
    """

    def generator(self, x: Tensor, c: dict[str, Tensor] | None = None) -> Iterator[Tensor]:
        for x in super().generator(x, c):  # noqa: B020 (each step's x feeds the next)
            yield x
        t = self.eval_steps[0] * torch.ones(x.size(0), device=x.device, dtype=torch.long)
        yield self.predictor.predict_x0(self.model(x, t, c).prediction, x, t).to(x.dtype)


class SolverSampler(nn.Module):
    """A multistep solver from diffusers over our noise schedule and guided network, order 2:
    DPM-Solver++ of the probability-flow ODE (algorithm `dpmsolver++`) or of the reverse SDE
    (`sde-dpmsolver++`, whose noise comes from the global RNG, seeded by the caller), or UniPC
    (`unipc`). One network evaluation per step, x0 clamped to [-1, 1] at every step as in our
    DDIM, the last step onto the data."""

    def __init__(self, model: nn.Module, algorithm: str, betas: Tensor, steps: int, clamp: bool,
                 order: int = 2) -> None:
        super().__init__()
        import diffusers  # pinned in pyproject.toml; imported here only, lazily: it takes seconds

        self.model, self.steps = model, steps
        options = {"num_train_timesteps": len(betas), "trained_betas": betas.double().numpy(),
                   "prediction_type": "epsilon", "solver_order": order,
                   "timestep_spacing": "linspace", "final_sigmas_type": "zero",
                   # diffusers' dynamic threshold with a ceiling of 1 is the plain clamp
                   "thresholding": clamp, "sample_max_value": 1.0}
        self.scheduler = (diffusers.UniPCMultistepScheduler(**options) if algorithm == "unipc"
                          else diffusers.DPMSolverMultistepScheduler(algorithm_type=algorithm,
                                                                     **options))

    def forward(self, x: Tensor, conditional_inputs: dict[str, Tensor] | None = None) -> Tensor:
        self.scheduler.set_timesteps(self.steps, device=x.device)  # also resets its history
        for t in self.scheduler.timesteps:
            eps = self.model(x, t.expand(len(x)), conditional_inputs).prediction
            x = self.scheduler.step(eps, t, x).prev_sample
        return x


class ConditionalDenoiser(nn.Module):
    """Class embedding + torchmultimodal's CFGuidance around a noise-prediction network.

    CFGuidance provides the learned null ("unconditional") embedding and the guided sampling.
    Label dropout during training is applied here from a mask the data pipeline draws per
    sample (see data.StepPlan), instead of CFGuidance's own per-call torch.rand, so that
    which labels are dropped does not depend on the world size or on the RNG of a rank.
    """

    def __init__(self, net: Network, num_classes: int, cond_dim: int) -> None:
        super().__init__()
        self.cond_dim = cond_dim
        self.class_embedding = nn.Embedding(num_classes, cond_dim)
        # p=0: CFGuidance must not drop labels itself (we do, deterministically, in forward).
        self.cfguidance = CFGuidance(net, {COND_KEY: cond_dim}, p=0.0, guidance=0.0)
        self._register_load_state_dict_pre_hook(_rename_old_keys)

    @property
    def null_embedding(self) -> Tensor:
        """The learned unconditional embedding, shape (1, cond_dim)."""
        return self.cfguidance.train_unconditional_embedding[COND_KEY]

    def guided(self, guidance: float) -> CFGuidance:
        """The network with guidance g, `(1+g)*cond - g*uncond`, sharing this module's weights
        (the training module itself is never changed)."""
        return CFGuidance(self.cfguidance.model, {COND_KEY: self.cond_dim}, p=0.0,
                          guidance=guidance,
                          train_unconditional_embeddings={COND_KEY: self.null_embedding.detach()})

    def condition(self, labels: Tensor, drop: Tensor | None = None) -> dict[str, Tensor]:
        """Class embeddings; rows where `drop` is set get the null embedding (CFG training)."""
        emb = self.class_embedding(labels)
        if drop is not None:
            # important: this is the label dropout that teaches the unconditional model for CFG
            emb = torch.where(drop[:, None], self.null_embedding.to(emb.dtype), emb)
        return {COND_KEY: emb}

    def forward(self, xt: Tensor, t: Tensor, labels: Tensor, drop: Tensor | None = None,
                keys: Tensor | None = None) -> NetworkOutput:
        """The prediction for x_t; `drop` (label dropout) and `keys` (the per-sample keys of the
        model's dropout masks) come from the data pipeline in training."""
        inputs = self.condition(labels, drop)
        if keys is not None:
            inputs[DROPOUT_KEYS] = keys  # CFGuidance passes inputs it does not guide through
        return self.cfguidance(xt, t, inputs)


def build_denoiser(cfg: ModelConfig, num_timesteps: int) -> ConditionalDenoiser:
    """The configured network (registry.MODELS) inside the class embedding + CFGuidance."""
    if cfg.num_classes is None or cfg.in_channels is None:
        raise ValueError("model.num_classes and model.in_channels come from the data: "
                         "use config.with_data_shape first")
    return ConditionalDenoiser(MODELS[cfg.name].build(cfg, num_timesteps), cfg.num_classes,
                               cfg.cond_dim)


def _rename_old_keys(state: dict[str, Tensor], prefix: str, *args: object) -> None:
    """Read weights saved before the guidance module was renamed from `cfg` to `cfguidance`."""
    for key in [k for k in state if k.startswith(prefix + "cfg.")]:
        state[prefix + "cfguidance." + key[len(prefix) + 4:]] = state.pop(key)


class Diffusion:
    """Noise schedule, forward noising, training loss and samplers of one configuration."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        betas = (linear_beta_schedule(cfg.steps) if cfg.beta_schedule == "linear"
                 else cosine_beta_schedule(cfg.steps))
        self.schedule = DeviceSchedule(betas)
        self.predictor = ConsistentNoisePredictor(self.schedule,
                                                  clamp_unit if cfg.clamp_x0 else None)
        self.hybrid = DiffusionHybridLoss(self.schedule) if cfg.loss == "hybrid" else None

    @property
    def num_timesteps(self) -> int:
        return self.cfg.steps

    def q_sample(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Noised data x_t ~ q(x_t | x_0) for the given noise and steps."""
        return self.schedule.q_sample(x0, noise, t)

    def loss(self, out: NetworkOutput, x0: Tensor, xt: Tensor, noise: Tensor, t: Tensor
             ) -> Tensor:
        """MSE on the predicted noise, plus the VLB term for the learned variance (hybrid)."""
        pred = out.prediction.float()
        if self.hybrid is None:
            return torch.nn.functional.mse_loss(pred, noise)
        value = out.variance_value.float()
        # Posterior mean/log-variance of the model, as DDPModule.predict_parameters computes them.
        x0_pred = self.predictor.predict_x0(pred, xt, t)
        mean, log_variance = self.schedule.q_posterior(x0_pred, xt, t, value)
        return self.hybrid(pred, noise, mean, log_variance, x0, xt, t)

    def eval_steps(self, steps: int) -> Tensor:
        """`steps` diffusion steps evenly spread over the schedule, for respaced sampling."""
        return torch.linspace(0, self.cfg.steps - 1, steps).round().long().unique()

    def sampler(self, denoiser: ConditionalDenoiser, kind: str, steps: int, guidance: float,
                eta: float = 0.0) -> nn.Module:
        """Sampler `kind` (registry.SAMPLERS) with CFG scale g, in eval mode. The steps are
        checked by config (check_sample, check_fid), as every caller's settings are."""
        module = SAMPLERS[kind].build(self, denoiser.guided(guidance), steps, eta)
        device = next(denoiser.parameters()).device
        return module.to(device).eval()


# ----------------------------------------------------------------------------- samplers
# registry.SAMPLERS' builders: builder(diffusion, guided network, steps, eta) -> nn.Module


def ddpm(diffusion: Diffusion, guided: CFGuidance, steps: int, eta: float) -> DDPModule:
    """torchmultimodal's DDPM, respaced to `steps`, with the learned variance."""
    return DDPModule(guided, diffusion.schedule, diffusion.predictor,
                     eval_steps=diffusion.eval_steps(steps), progress_bar=False)


def ddim(diffusion: Diffusion, guided: CFGuidance, steps: int, eta: float) -> DDIMToData:
    """DDIM (eta = 0: deterministic), ending on the data."""
    return DDIMToData(guided, diffusion.schedule, diffusion.predictor,
                      eval_steps=diffusion.eval_steps(steps), progress_bar=False, eta=eta)


def solver(diffusion: Diffusion, guided: CFGuidance, steps: int, eta: float,
           algorithm: str) -> SolverSampler:
    """One of diffusers' solvers (SolverSampler's `algorithm`)."""
    return SolverSampler(guided, algorithm, diffusion.schedule.betas, steps,
                         diffusion.cfg.clamp_x0)
