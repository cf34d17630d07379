"""Models: shapes, SeedUNet's parameter count from its specification, FLOP counting."""

from __future__ import annotations

import pytest
import torch

from ddp_diffusion.config import ModelConfig
from ddp_diffusion.model import SeedUNet, UNet, build_denoiser, count_parameters, forward_gflops


def conv(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k * k + cout


def seed_unet_params_from_spec(time_steps: int = 1000, time_dim: int = 32, cond: int = 32) -> int:
    """The count implied by the code-along's description, computed independently."""
    c = time_dim + cond
    down = lambda i, o: conv(i + c, o) + conv(o, o)  # noqa: E731
    up = lambda i, o: conv(2 * i, o) + conv(o, o)  # noqa: E731
    return (time_steps * time_dim + conv(1, 128) + down(128, 256) + down(256, 512)
            + down(512, 512) + up(512, 256) + up(256, 128) + 2 * conv(128, 1))


def test_seed_unet_parameter_count_matches_spec() -> None:
    assert count_parameters(SeedUNet()) == seed_unet_params_from_spec() == 13_604_866
    denoiser = build_denoiser(ModelConfig(name="seed_unet"), 1000)
    # + the class embedding nn.Embedding(10, 32) and CFGuidance's learned null embedding (1, 32)
    assert count_parameters(denoiser) == 13_604_866 + 10 * 32 + 32


@pytest.mark.parametrize("name", ["seed_unet", "unet"])
def test_output_shapes(name: str) -> None:
    cfg = ModelConfig(name=name, channels=16, channel_mult=[1, 2], num_res_blocks=1)
    denoiser = build_denoiser(cfg, 1000)
    x = torch.randn(3, 1, 32, 32)
    out = denoiser(x, torch.tensor([0, 500, 999]), torch.tensor([0, 5, 9]))
    assert out.prediction.shape == (3, 1, 32, 32)
    assert out.variance_value.shape == (3, 1, 32, 32)


def test_unet_conditions_on_class_and_time() -> None:
    torch.manual_seed(0)
    net = UNet(ModelConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1))
    for p in net.parameters():  # leave zero-init: random weights everywhere to see the inputs
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 1, 32, 32)
    c0, c1 = torch.zeros(1, 32), torch.ones(1, 32)
    t = torch.tensor([10])
    base = net(x, t, {"context": c0}).prediction
    assert not torch.allclose(base, net(x, t, {"context": c1}).prediction)
    assert not torch.allclose(base, net(x, torch.tensor([900]), {"context": c0}).prediction)


def test_forward_gflops() -> None:
    # The code-along's U-Net: ~7.7 GFLOP per 32x32 image forward (2 FLOPs per multiply-add).
    assert forward_gflops(build_denoiser(ModelConfig(name="seed_unet"), 1000), 32) == \
        pytest.approx(7.746, rel=1e-3)
    small = build_denoiser(ModelConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1), 1000)
    assert 0 < forward_gflops(small, 32) < 0.2
