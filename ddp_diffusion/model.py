"""Noise-prediction networks: the code-along's SeedUNet and our modern UNet.

Both are network.Networks: they take (x_t, t, {COND_KEY: class embedding}) and return a
NetworkOutput with the predicted noise and the learned-variance value used by the hybrid loss.
Their builders, `seed_unet` and `unet`, are registered in registry.MODELS.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ddp_diffusion.config import ModelConfig
from ddp_diffusion.network import COND_KEY, DROPOUT_KEYS, NetworkOutput

# ----------------------------------------------------------------------------- SeedUNet


class DownBlock(nn.Module):
    """Two 3x3 conv+ReLU on [x, broadcast condition], then 2x average pooling."""

    def __init__(self, in_ch: int, out_ch: int, cond_ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_ch + cond_ch, out_ch, 3, padding=1), nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        c = cond.expand(-1, -1, x.shape[2], x.shape[3])
        full = self.block(torch.cat([x, c], dim=1))
        return full, self.pool(full)


class UpBlock(nn.Module):
    """Upsample the smaller input 2x, concatenate the skip, two 3x3 conv+ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2)
        self.block = nn.Sequential(
            nn.Conv2d(2 * in_ch, out_ch, 3, padding=1), nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU(),
        )

    def forward(self, skip: Tensor, small: Tensor) -> Tensor:
        return self.block(torch.cat([self.upsample(small), skip], dim=1))


class SeedUNet(nn.Module):
    """The code-along's U-Net, layer for layer (the baseline we compare against)."""

    def __init__(self, num_timesteps: int = 1000, time_dim: int = 32, cond_dim: int = 32,
                 in_channels: int = 1) -> None:
        super().__init__()
        cond = time_dim + cond_dim
        self.time_embedding = nn.Embedding(num_timesteps, time_dim)
        self.conv = nn.Conv2d(in_channels, 128, 3, padding=1)
        self.down = nn.ModuleList([DownBlock(128, 256, cond), DownBlock(256, 512, cond)])
        self.bottleneck = DownBlock(512, 512, cond)
        self.up = nn.ModuleList([UpBlock(512, 256), UpBlock(256, 128)])
        self.prediction = nn.Conv2d(128, in_channels, 3, padding=1)
        self.variance = nn.Conv2d(128, in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, conditional_inputs: dict[str, Tensor]
                ) -> NetworkOutput:
        b = x.shape[0]
        cond = torch.cat([self.time_embedding(t).view(b, -1, 1, 1),
                          conditional_inputs[COND_KEY].view(b, -1, 1, 1)], dim=1).to(x.dtype)
        x = self.conv(x)
        skips = []
        for block in self.down:
            full, x = block(x, cond)
            skips.append(full)
        x, _ = self.bottleneck(x, cond)  # the bottleneck uses its full-resolution output
        for block in self.up:
            x = block(skips.pop(), x)
        return NetworkOutput(prediction=self.prediction(x), variance_value=self.variance(x))


# ----------------------------------------------------------------------------- UNet


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer diffusion steps, shape (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows, else 8."""
    return nn.GroupNorm(32 if ch % 32 == 0 and ch >= 128 else 8, ch)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


_M2 = 0x846CA68B - 2**32  # lowbias32's second multiplier as the int32 with the same bits
_GOLDEN64 = 0x9E3779B97F4A7C15 - 2**64  # odd 64-bit multiplier (2**64 / golden ratio), signed


def lowbias32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 integer hash, element-wise, on int32 tensors (the uint32 bit patterns)."""
    # int32 multiplies wrap mod 2**32 (CPU and CUDA); `>>` is arithmetic, so the mask makes it
    # the logical shift the hash is defined with
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


class KeyedDropout(nn.Module):
    """Dropout whose mask for a sample depends only on that sample's key, this layer's salt and
    the element's position: the data pipeline draws one key per sample from (seed, step, index
    in the global batch), so a sample gets the same mask at any world size and in any
    micro-batch, and a resume on another world size stays exact. The identity in eval mode.

    The element at flat position i of a sample with key k is kept (and scaled by 1 / (1 - p))
    when M2 * xorshift16(a + P[i] * t) >= round(p * 2**32) - 2**31, in int32 arithmetic mod
    2**32, with M2 lowbias32's second multiplier and xorshift16(h) = h ^ (h >>> 16). P[i] =
    lowbias32(lowbias32(i) ^ lowbias32(salt)) is a per-layer table made once per shape and
    device, and (a, t) are the high word and the low word (made odd) of k * GOLDEN64 mod 2**64.
    Keys should be below 2**32 (the pipeline's are below 2**31): above, two keys that differ
    only in high bits may get correlated masks."""

    def __init__(self, p: float, salt: int) -> None:
        super().__init__()
        self.p = p
        self.salt = salt
        # Not buffers: checkpoints stay as they were and the table is rebuilt on any device.
        self._tables: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def _table(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """P: the int32 hash of (salt, position) for one sample's elements."""
        position = lowbias32(torch.arange(math.prod(shape), dtype=torch.int32, device=device))
        salt = lowbias32(torch.tensor(self.salt, dtype=torch.int32, device=device))
        return lowbias32(position ^ salt).view(shape)

    def forward(self, x: Tensor, keys: Tensor | None) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if keys is None:
            raise ValueError("model dropout in training needs the batch's per-sample keys")
        shape = tuple(x.shape[1:])
        if torch.compiler.is_compiling():  # traced: the table is fused into the kernel
            table = self._table(shape, x.device)
        else:  # eager: hashed once, then read (4 bytes an element of one sample)
            table = self._tables.get((shape, x.device))
            if table is None:
                table = self._tables[shape, x.device] = self._table(shape, x.device)
        # Per sample (b elements): two 32-bit words of a 64-bit multiply. a enters added and t
        # multiplied, so two keys whose t differ only in high bits (which a multiply spreads
        # upwards only) still differ in a, and their masks stay independent.
        z = keys.long().view(-1, *[1] * len(shape)) * _GOLDEN64 | 1
        a, t = (z >> 32).to(torch.int32), z.to(torch.int32)  # to(int32) keeps the low word
        # Full size, in place where it can be: the hash is a bijection of a + P * t (uniform
        # since t is odd), so the threshold keeps a fraction 1 - p to within 2**-32.
        h = torch.addcmul(a, table, t)
        h ^= (h >> 16).bitwise_and_(0xFFFF)
        h *= _M2
        keep = h >= min(round(self.p * 2**32) - 2**31, 2**31 - 1)
        # x * keep, not where/masked_fill: those were 1.2-1.4x slower on CPU
        return x.mul(keep).mul_(1 / (1 - self.p))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with FiLM (scale, shift) from the time+class embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, salt: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = KeyedDropout(dropout, salt)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor, keys: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h), keys))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a low-resolution feature map."""

    def __init__(self, ch: int, head_dim: int = 32) -> None:
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                             v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Residual U-Net (ADM-style, small): sinusoidal time embedding, FiLM class conditioning,
    self-attention at the listed resolutions, and a learned-variance head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch = cfg.channels
        emb_dim = 4 * ch
        self.channels = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(cfg.cond_dim, emb_dim)
        self.stem = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        res, widths = cfg.image_size, [ch]
        salts = itertools.count(1)  # one dropout salt per block: masks differ between layers
        self.down = nn.ModuleList()
        cur = ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, emb_dim, cfg.dropout, salt=next(salts))]
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    blocks.append(Attention(cur))
                self.down.append(nn.ModuleList(blocks))
                widths.append(cur)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                widths.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, cfg.dropout, salt=next(salts)),
                                  Attention(cur),
                                  ResBlock(cur, cur, emb_dim, cfg.dropout, salt=next(salts))])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(cur + widths.pop(), ch * mult, emb_dim, cfg.dropout,
                                   salt=next(salts))]
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    blocks.append(Attention(cur))
                if level > 0 and i == cfg.num_res_blocks:
                    blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(cur, cur, 3, padding=1)]
                    res *= 2
                self.up.append(nn.ModuleList(blocks))
        self.out = nn.Sequential(group_norm(cur), nn.SiLU(),
                                 zero_init(nn.Conv2d(cur, 2 * cfg.in_channels, 3, padding=1)))

    @staticmethod
    def _run(blocks: nn.ModuleList, h: Tensor, emb: Tensor, keys: Tensor | None) -> Tensor:
        for layer in blocks:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, keys)
            else:
                h = layer(h, emb) if isinstance(layer, Attention) else layer(h)
        return h

    def forward(self, x: Tensor, t: Tensor, conditional_inputs: dict[str, Tensor]
                ) -> NetworkOutput:
        emb = self.time_mlp(timestep_embedding(t, self.channels).to(x.dtype))
        emb = F.silu(emb + self.cond_proj(conditional_inputs[COND_KEY].to(x.dtype)))
        keys = conditional_inputs.get(DROPOUT_KEYS)
        h = self.stem(x)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb, keys)
            skips.append(h)
        h = self._run(self.mid, h, emb, keys)
        for blocks in self.up:
            h = self._run(blocks, torch.cat([h, skips.pop()], dim=1), emb, keys)
        pred, var = self.out(h).chunk(2, dim=1)
        return NetworkOutput(prediction=pred, variance_value=var)


# ----------------------------------------------------------------------------- builders


def seed_unet(cfg: ModelConfig, num_timesteps: int) -> SeedUNet:
    """The code-along's U-Net, with its time embedding table of num_timesteps rows."""
    return SeedUNet(num_timesteps, time_dim=32, cond_dim=cfg.cond_dim, in_channels=cfg.in_channels)


def unet(cfg: ModelConfig, num_timesteps: int) -> UNet:
    """Our UNet (its sinusoidal time embedding needs no number of steps)."""
    return UNet(cfg)


# ----------------------------------------------------------------------------- cost


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (shared ones counted once)."""
    return sum(p.numel() for p in module.parameters())


def _meta_forward(denoiser: nn.Module, image_size: int, channels: int, batch: int = 1) -> None:
    """One forward of `batch` images through a denoiser (a diffusion.ConditionalDenoiser, called
    with images, steps, labels and dropout keys) on the meta device (shapes only, the module's
    tensors swapped for meta ones): nothing is computed or allocated, so any size takes
    milliseconds."""
    meta = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
            for name, t in itertools.chain(denoiser.named_parameters(), denoiser.named_buffers())}
    x = torch.zeros(batch, channels, image_size, image_size, device="meta")
    index = torch.zeros(batch, dtype=torch.long, device="meta")  # the step, label and dropout key
    torch.func.functional_call(denoiser, meta, (x, index, index), {"keys": index})


def forward_gflops(denoiser: nn.Module, image_size: int, channels: int = 1) -> float:
    """Forward GFLOP per image (multiply-add = 2 FLOPs), counted with torch's FlopCounterMode
    on a meta forward."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        _meta_forward(denoiser, image_size, channels)
    return counter.get_total_flops() / 1e9


def activation_bytes(denoiser: nn.Module, image_size: int, channels: int) -> int:
    """Bytes (fp32) of the tensors autograd keeps from one image's forward for its backward:
    what training memory grows by per image of a micro-batch. From meta forwards of 1 and 2
    images, whose difference leaves out what does not grow with the batch (weights)."""
    def saved_bytes(batch: int) -> int:
        saved: dict[int, Tensor] = {}  # by identity: a tensor saved by two ops is stored once

        def pack(t: Tensor) -> None:
            saved[id(t)] = t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            _meta_forward(denoiser, image_size, channels, batch)
        return sum(t.numel() * t.element_size() for t in saved.values())

    return saved_bytes(2) - saved_bytes(1)
