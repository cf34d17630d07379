"""Models: shapes, SeedUNet's parameter count from its specification, FLOP counting, and
KeyedDropout: its masks, their statistics and its cost in aten ops."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from typing import Any

import pytest
import torch
from conftest import TINY_MODEL
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ddp_diffusion.config import ModelConfig
from ddp_diffusion.diffusion import build_denoiser
from ddp_diffusion.model import (
    KeyedDropout,
    SeedUNet,
    UNet,
    count_parameters,
    forward_gflops,
    lowbias32,
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
    denoiser = build_denoiser(dataclasses.replace(TINY_MODEL, name=name), 1000)
    x = torch.randn(3, 1, 32, 32)
    out = denoiser(x, torch.tensor([0, 500, 999]), torch.tensor([0, 5, 9]))
    assert out.prediction.shape == (3, 1, 32, 32)
    assert out.variance_value.shape == (3, 1, 32, 32)


def test_unet_conditions_on_class_and_time() -> None:
    torch.manual_seed(0)
    net = UNet(TINY_MODEL)
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
    # The small UNet (with attention): the count on the meta device is what torch counts for a
    # real forward, per image.
    small = build_denoiser(TINY_MODEL, 1000)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        small(torch.randn(3, 1, 32, 32), torch.tensor([1, 500, 999]), torch.arange(3))
    assert counter.get_flop_counts()["Global"][torch.ops.aten.bmm]  # attention is counted
    assert forward_gflops(small, 32) == counter.get_total_flops() / 3 / 1e9


def test_forward_gflops_of_a_large_image_allocates_nothing() -> None:
    """4096x4096 needed tens of GB of real activations to be counted. The code-along's U-Net is
    all convolutions (no attention): its FLOPs grow exactly with the pixels."""
    seed = build_denoiser(ModelConfig(name="seed_unet", num_classes=10, in_channels=1), 1000)
    start_s = time.monotonic()
    assert forward_gflops(seed, 4096) == pytest.approx(forward_gflops(seed, 32) * 128**2,
                                                       rel=1e-6)
    assert time.monotonic() - start_s < 10  # the 32x32 count alone took ~0.1 s of real compute


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


def lowbias32_reference(x: int) -> int:
    """Wellons' lowbias32 on Python ints (uint32 values)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def as_int32(v: int) -> int:
    """The int32 with the same 32 bits as v."""
    v &= 0xFFFFFFFF
    return v - 2**32 if v >= 2**31 else v


def test_lowbias32_matches_the_reference() -> None:
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    out = lowbias32(torch.tensor([as_int32(v) for v in values], dtype=torch.int32))
    assert [v & 0xFFFFFFFF for v in out.tolist()] == [lowbias32_reference(v) for v in values]


def test_keyed_dropout_mask_is_the_documented_hash() -> None:
    """Element for element against the docstring's formula in Python ints: pins the masks, so
    a kernel that computed them differently (a vectorised or a scalar path, another device)
    would fail here rather than resume with other masks."""
    p, salt, shape = 0.3, 5, (3, 5, 7)  # 105 elements: vector lanes and a scalar tail
    keys = [0, 1, 2**31 - 1, 2**32 - 1, 987654321]
    out = KeyedDropout(p, salt).train()(torch.ones(len(keys), *shape), torch.tensor(keys))
    threshold = round(p * 2**32) - 2**31
    salt_hash = lowbias32_reference(salt)
    expected = []
    for k in keys:
        z = (k * 0x9E3779B97F4A7C15 | 1) % 2**64
        a, t = z >> 32, z & 0xFFFFFFFF
        for i in range(105):
            table = lowbias32_reference(lowbias32_reference(i) ^ salt_hash)
            h = (a + table * t) & 0xFFFFFFFF
            h = ((h ^ (h >> 16)) * 0x846CA68B) & 0xFFFFFFFF
            expected.append(as_int32(h) >= threshold)
    assert (out != 0).flatten().tolist() == expected


def test_keyed_dropout_same_mask_alone_or_in_a_batch_of_seven() -> None:
    """A batch of 1 and a batch of 7 run through the CPU kernels in different chunks (vector
    lanes against scalar tails): the masks must not depend on which."""
    drop = KeyedDropout(0.5, salt=2).train()
    x = torch.randn(7, 3, 5, 7)  # 105 elements a sample, 735 a batch: neither a lane multiple
    keys = torch.tensor([3, 2**31 - 5, 77, 0, 123456789, 2**30, 9])
    whole = drop(x, keys)
    for i in range(7):
        assert torch.equal(drop(x[i:i + 1], keys[i:i + 1]), whole[i:i + 1])


def test_keyed_dropout_compiled_gives_the_eager_masks() -> None:
    """train.compile traces the position table into the kernel instead of caching it."""
    drop = KeyedDropout(0.3, salt=5).train()
    x = torch.randn(4, 3, 5, 7)
    keys = torch.tensor([1, 2**31 - 1, 40, 7])
    assert torch.equal(torch.compile(drop)(x, keys), drop(x, keys))


def bonferroni_z(tests: int, alpha: float = 1e-3) -> float:
    """The |z| that `tests` two-sided tests together exceed with probability alpha."""
    return statistics.NormalDist().inv_cdf(1 - alpha / (2 * tests))


def test_keyed_dropout_keeps_a_fraction_one_minus_p() -> None:
    x = torch.ones(16, 8, 32, 32)
    keys = torch.arange(16)
    ps = [0.05, 0.1, 0.5, 0.9]
    z = bonferroni_z(len(ps))
    for p in ps:
        kept = (KeyedDropout(p, salt=1).train()(x, keys) != 0).double().mean().item()
        assert abs(kept - (1 - p)) < z * (p * (1 - p) / x.numel()) ** 0.5, p


def test_keyed_dropout_masks_are_uncorrelated() -> None:
    """At p = 0.5 two independent masks agree on half the positions: across keys (consecutive
    ones, and ones that differ only in high bits, which a multiply alone does not mix), across
    layers, and between neighbouring positions (left-right, up-down, channel to channel, in
    disjoint pairs so that each pair is one independent draw). Each bound is the Bonferroni
    z of all comparisons times the standard error 0.5 / sqrt(n) of n positions."""
    keys = [0, 1, 2, 3, 4, 5, 2**16, 2**24, 2**29, 2**30, 2**30 + 1, 2**31 - 1, 2**31 - 2,
            123456789, 1073741823, 2**32 - 1]
    x = torch.ones(len(keys), 8, 32, 32)
    masks = KeyedDropout(0.5, salt=1).train()(x, torch.tensor(keys)) != 0
    other_layer = KeyedDropout(0.5, salt=2).train()(x, torch.tensor(keys)) != 0
    comparisons: list[tuple[Any, Tensor, Tensor]] = [
        ((keys[i], keys[j]), masks[i], masks[j])
        for i, j in itertools.combinations(range(len(keys)), 2)]
    comparisons += [(("layers", k), masks[i], other_layer[i]) for i, k in enumerate(keys)]
    comparisons += [("left-right", masks[..., 0::2], masks[..., 1::2]),
                    ("up-down", masks[..., 0::2, :], masks[..., 1::2, :]),
                    ("channels", masks[:, 0::2], masks[:, 1::2])]
    z = bonferroni_z(len(comparisons))
    for name, a, b in comparisons:
        agree = (a == b).double().mean().item()
        assert abs(agree - 0.5) < z * 0.5 / a.numel() ** 0.5, (name, agree)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it; `full` those whose output has `full_size` elements."""

    def __init__(self, full_size: int = -1) -> None:
        super().__init__()
        self.ops = self.full = 0
        self.full_size = full_size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.full += isinstance(out, torch.Tensor) and out.numel() == self.full_size
        return out


FULL_OPS, TINY_OPS = 8, 6  # KeyedDropout's design: on the activation, and on the b keys


def test_keyed_dropout_layer_makes_a_few_aten_ops() -> None:
    drop = KeyedDropout(0.1, salt=1).train()
    x, keys = torch.randn(4, 8, 16, 16), torch.arange(4)
    drop(x, keys)  # the first call hashes the position table
    with OpCounter(x.numel()) as count:
        drop(x, keys)
    assert (count.full, count.ops - count.full) == (FULL_OPS, TINY_OPS)


def test_unet_dropout_costs_a_constant_number_of_aten_ops_per_layer() -> None:
    def forward_ops(dropout: float) -> tuple[int, int]:
        """Aten ops of a training forward (tables built), and the number of dropout layers."""
        model = build_denoiser(dataclasses.replace(TINY_MODEL, dropout=dropout), 100).train()
        x, t, labels = torch.randn(4, 1, 32, 32), torch.tensor([1, 20, 50, 99]), torch.arange(4)
        keys = torch.tensor([5, 6, 7, 8])
        model(x, t, labels, keys=keys)  # the first forward hashes the position tables
        with OpCounter() as count:
            model(x, t, labels, keys=keys)
        return count.ops, sum(isinstance(m, KeyedDropout) and m.p > 0 for m in model.modules())

    base, no_layers = forward_ops(0.0)
    ops, layers = forward_ops(0.1)
    assert no_layers == 0 and layers == 8  # 2 down, 2 middle, 4 up
    assert ops - base <= (FULL_OPS + TINY_OPS) * layers
