"""Numeric precision: which one `auto` means on this device, and the autocast context for it."""

from __future__ import annotations

import contextlib

import torch


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 convolutions run natively (CUDA, or a CPU with AVX-512 BF16/AMX).

    Without native support PyTorch falls back to a slow reference convolution: measured 8x
    slower than fp32 on an AVX2-only CPU.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where it is fast on this device, else fp32; other values unchanged."""
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on the device, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
