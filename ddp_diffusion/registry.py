"""The models, samplers and data sources by name: a one-line doc, a builder and a settings check.

Adding one is its builder (a new file or function) plus one line here: the config's choices and
validation and the command line's choices and help all come from these tables. This module is
torch-free, like config.py, which reads it, so that a bad setting fails in a fraction of a
second, before torch is imported: builders and checks are named "module:function" and imported
only when called (builders' modules import torch; checks' must not).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


def resolve(ref: str) -> Callable[..., Any]:
    """The function a "module:function" reference names, its module imported on first use."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Entry:
    """One registered choice."""

    doc: str  # one line, for --help
    builder: str  # "module:function", called by build
    check: str | None = None  # "module:function" raising a one-line UserError for a setting
    options: Mapping[str, Any] = field(default_factory=dict)  # the builder's keyword arguments

    def build(self, *args: Any) -> Any:
        """The builder's result for args (and this entry's options)."""
        return resolve(self.builder)(*args, **self.options)

    def check_settings(self, section: Any) -> None:
        """Run this entry's check on its config section (config.validate, before torch)."""
        if self.check:
            resolve(self.check)(section)


# builder(cfg: ModelConfig, num_timesteps: int) -> network.Network; check(cfg: ModelConfig)
MODELS = {
    "unet": Entry("residual U-Net (ADM-style): FiLM conditioning, attention, learned variance",
                  "ddp_diffusion.model:unet", "ddp_diffusion.config:check_unet"),
    "seed_unet": Entry("the code-along's U-Net, layer for layer (13.6M parameters)",
                       "ddp_diffusion.model:seed_unet", "ddp_diffusion.config:check_seed_unet"),
}

# builder(diffusion: Diffusion, guided: CFGuidance, steps: int, eta: float) -> the sampler, an
# nn.Module called as sampler(noise, conditional_inputs); steps are checked by config
SAMPLERS = {
    "ddpm": Entry("ancestral, with the learned variance, respaced (improved DDPM)",
                  "ddp_diffusion.diffusion:ddpm"),
    "ddim": Entry("deterministic (sample.eta > 0 adds noise), ends on the clamped x0",
                  "ddp_diffusion.diffusion:ddim"),
    "dpm++": Entry("DPM-Solver++, second-order multistep, deterministic (diffusers)",
                   "ddp_diffusion.diffusion:solver", options={"algorithm": "dpmsolver++"}),
    "sde-dpm++": Entry("DPM-Solver++ of the reverse SDE, second order, stochastic (diffusers)",
                       "ddp_diffusion.diffusion:solver", options={"algorithm": "sde-dpmsolver++"}),
    "unipc": Entry("UniPC, second-order predictor-corrector, deterministic (diffusers)",
                   "ddp_diffusion.diffusion:solver", options={"algorithm": "unipc"}),
}

# builder(cfg: DataConfig, image_size: int, num_workers: int, train: bool) -> sources.Source
# (train=False: the test split); check(cfg: DataConfig)
DATASETS = {
    "fashion_mnist": Entry("Fashion-MNIST (torchvision, or Debian's dataset-fashion-mnist)",
                           "ddp_diffusion.sources:fashion_mnist",
                           "ddp_diffusion.config:check_no_path"),
    "mnist": Entry("MNIST (torchvision)", "ddp_diffusion.sources:mnist",
                   "ddp_diffusion.config:check_no_path"),
    "cifar10": Entry("CIFAR-10 (torchvision)", "ddp_diffusion.sources:cifar10",
                     "ddp_diffusion.config:check_no_path"),
    "image_folder": Entry("your images in data.path: a subfolder per class, or one class",
                          "ddp_diffusion.sources:image_folder",
                          "ddp_diffusion.config:check_image_folder"),
}
