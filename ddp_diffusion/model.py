"""Noise-prediction networks: the code-along's SeedUNet and our modern UNet.

Both take (x_t, t, {COND_KEY: class embedding}) and return a DiffusionOutput with the predicted
noise and the learned-variance interpolation value used by the hybrid loss.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ddp_diffusion.config import ModelConfig
from ddp_diffusion.diffusion import COND_KEY, DROPOUT_KEYS, ConditionalDenoiser, DiffusionOutput

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
                ) -> DiffusionOutput:
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
        return DiffusionOutput(prediction=self.prediction(x), variance_value=self.variance(x))


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


UINT32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 tensors holding uint32 values, with no int64 overflow."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & UINT32


def hash32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 integer hash, element-wise, on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class KeyedDropout(nn.Module):
    """Dropout whose mask for a sample depends only on that sample's key, this layer's salt and
    the element's position: the data pipeline draws one key per sample from (seed, step, index
    in the global batch), so a sample gets the same mask at any world size and in any
    micro-batch, and a resume on another world size stays exact. The identity in eval mode."""

    def __init__(self, p: float, salt: int) -> None:
        super().__init__()
        self.p = p
        self.salt = salt

    def forward(self, x: Tensor, keys: Tensor | None) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if keys is None:
            raise ValueError("model dropout in training needs the batch's per-sample keys")
        per_sample = hash32((keys.long() ^ self.salt) & UINT32)
        position = torch.arange(x[0].numel(), device=x.device)
        bits = hash32(per_sample[:, None] ^ position[None])
        keep = (bits >= round(self.p * 2**32)).view(x.shape)
        return x * keep.to(x.dtype) / (1 - self.p)


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
                ) -> DiffusionOutput:
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
        return DiffusionOutput(prediction=pred, variance_value=var)


# ----------------------------------------------------------------------------- builders


def build_denoiser(cfg: ModelConfig, num_timesteps: int) -> ConditionalDenoiser:
    """The configured network inside the class embedding + CFGuidance wrapper."""
    if cfg.num_classes is None or cfg.in_channels is None:
        raise ValueError("model.num_classes and model.in_channels come from the data: "
                         "use config.with_data_shape first")
    if cfg.name == "seed_unet":
        net: nn.Module = SeedUNet(num_timesteps, time_dim=32, cond_dim=cfg.cond_dim,
                                  in_channels=cfg.in_channels)
    else:
        net = UNet(cfg)
    return ConditionalDenoiser(net, cfg.num_classes, cfg.cond_dim)


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (shared ones counted once)."""
    return sum(p.numel() for p in module.parameters())


def forward_gflops(denoiser: ConditionalDenoiser, image_size: int, channels: int = 1) -> float:
    """Forward GFLOP per image (multiply-add = 2 FLOPs), counted with torch's FlopCounterMode."""
    device = next(denoiser.parameters()).device
    x = torch.zeros(1, channels, image_size, image_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        denoiser(x, t, labels, keys=torch.zeros(1, dtype=torch.long, device=device))
    return counter.get_total_flops() / 1e9
