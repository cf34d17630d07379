"""Models: shapes, SeedUNet's parameter count from its specification, FLOP counting."""

from __future__ import annotations

import pytest
import torch

from ddp_diffusion.config import ModelConfig
from ddp_diffusion.model import (
    KeyedDropout,
    SeedUNet,
    UNet,
    build_denoiser,
    count_parameters,
    forward_gflops,
    hash32,
)


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
    denoiser = build_denoiser(ModelConfig(name="seed_unet", num_classes=10, in_channels=1), 1000)
    # + the class embedding nn.Embedding(10, 32) and CFGuidance's learned null embedding (1, 32)
    assert count_parameters(denoiser) == 13_604_866 + 10 * 32 + 32


@pytest.mark.parametrize("name", ["seed_unet", "unet"])
def test_output_shapes(name: str) -> None:
    cfg = ModelConfig(name=name, channels=16, channel_mult=[1, 2], num_res_blocks=1,
                      num_classes=10, in_channels=1)
    denoiser = build_denoiser(cfg, 1000)
    x = torch.randn(3, 1, 32, 32)
    out = denoiser(x, torch.tensor([0, 500, 999]), torch.tensor([0, 5, 9]))
    assert out.prediction.shape == (3, 1, 32, 32)
    assert out.variance_value.shape == (3, 1, 32, 32)


def test_unet_conditions_on_class_and_time() -> None:
    torch.manual_seed(0)
    net = UNet(ModelConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1, in_channels=1))
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
    seed = ModelConfig(name="seed_unet", num_classes=10, in_channels=1)
    assert forward_gflops(build_denoiser(seed, 1000), 32) == pytest.approx(7.746, rel=1e-3)
    small = build_denoiser(ModelConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1,
                                       num_classes=10, in_channels=1), 1000)
    assert 0 < forward_gflops(small, 32) < 0.2


def test_keyed_dropout_gives_a_sample_the_same_mask_in_any_batch() -> None:
    """What makes a resume on another world size exact with model.dropout > 0."""
    drop = KeyedDropout(0.25, salt=3).train()
    x = torch.ones(6, 8, 16, 16)
    keys = torch.tensor([11, 12, 13, 14, 15, 16])
    whole = drop(x, keys)
    halves = torch.cat([drop(x[:2], keys[:2]), drop(x[2:], keys[2:])])  # two ranks' slices
    assert torch.equal(whole, halves)
    assert torch.equal(drop(x[4:5], keys[4:5]), whole[4:5])  # alone, the same mask
    assert whole.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]  # dropped, or scaled up
    assert abs((whole == 0).float().mean().item() - 0.25) < 0.02  # 12288 draws: sd 0.004
    assert not torch.equal(whole[0], whole[1])  # each sample its own mask
    assert not torch.equal(KeyedDropout(0.25, salt=4).train()(x, keys), whole)  # each layer too
    assert torch.equal(drop.eval()(x, None), x)  # eval: the identity
    with pytest.raises(ValueError, match="needs the batch's per-sample keys"):
        drop.train()(x, None)


def test_hash32_matches_the_reference_lowbias32() -> None:
    def reference(x: int) -> int:  # Wellons' lowbias32 on Python ints
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    assert hash32(torch.tensor(values)).tolist() == [reference(v) for v in values]
