"""The contract between a noise-prediction network (model.py) and the diffusion around it
(diffusion.py): how a network is called and what it returns.

Below both: the networks implement it without knowing the diffusion, which wraps any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

COND_KEY = "context"  # the conditional-input name the networks read, as in the code-along
DROPOUT_KEYS = "dropout_keys"  # per-sample keys of the model's dropout masks (training only)


@dataclass
class NetworkOutput:
    """A network's prediction for x_t. A dataclass, not a tuple: torchmultimodal's CFGuidance
    and samplers read these two fields by name, and guidance rewrites them in place."""

    prediction: Tensor  # the noise in x_t, shaped like x_t
    # v, shaped like x_t: the log variance is v * upper + (1 - v) * lower bound of the posterior's
    # (improved DDPM's learned variance); read by the hybrid loss and the ddpm sampler only
    variance_value: Tensor | None = None


class Network(Protocol):
    """A noise-prediction network: an nn.Module called as net(x, t, conditional_inputs).

    - x: the noised images x_t, (b, C, S, S) with C = model.in_channels and S =
      model.image_size, in float32 or the autocast dtype.
    - t: each image's diffusion step, (b,) int64 in [0, diffusion.steps).
    - conditional_inputs[COND_KEY]: (b, model.cond_dim), each image's class embedding, or the
      learned null embedding where the label is dropped (training) or unguided (sampling).
    - conditional_inputs[DROPOUT_KEYS]: (b,) int64, in training only (absent in eval, where
      dropout is off): the keys a network's dropout draws its masks from (model.KeyedDropout),
      so that a run resumes exactly at any world size.

    Returns a NetworkOutput. What diffusion.py relies on: row i of the output depends on row i
    of the inputs only (guided sampling evaluates the conditional and unconditional halves as
    one batch of 2b, and a grid sampled in chunks must equal the one sampled at once); the
    parameters are saved in checkpoints under `cfguidance.model.`, so renaming a layer breaks
    the loading of earlier runs. A network is built by a registry.MODELS builder,
    builder(cfg: ModelConfig, num_timesteps: int).
    """

    def __call__(self, x: Tensor, t: Tensor, conditional_inputs: dict[str, Tensor]
                 ) -> NetworkOutput: ...
