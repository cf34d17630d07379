"""How much of the chip a run uses: achieved TFLOP/s per device, and the fraction of its peak.

A training step costs 3x the forward FLOPs per image (the backward pass computes gradients for
both activations and weights, 2x the forward), counted once at start-up with torch's
FlopCounterMode. The peak is the vendor's dense (no sparsity) tensor-core number for the
precision in use, or `train.peak_tflops` where the user measured or knows better; on a CPU
there is none unless set.
"""

from __future__ import annotations

import re

import torch

# Dense bf16/fp16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets; the first pattern
# that matches torch.cuda.get_device_name() wins, so specific names come before general ones.
# TF32 (what fp32 uses here) is half of these on every GPU listed.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
)


def table_peak_tflops(device_name: str, precision: str) -> float | None:
    """The listed dense peak of a GPU at a precision, or None if it is not listed."""
    for pattern, bf16_peak in GPU_PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(pattern)}\b", device_name):
            return bf16_peak / 2 if precision == "fp32" else bf16_peak
    return None


def peak_tflops(device: torch.device, precision: str, configured: float) -> float | None:
    """Peak TFLOP/s of one device: train.peak_tflops if set (> 0), else the GPU table."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        return table_peak_tflops(torch.cuda.get_device_name(device), precision)
    return None


def achieved_tflops(images_per_s: float, train_gflop_per_image: float, world_size: int
                    ) -> float:
    """TFLOP/s each device achieved, from the global images/s and the FLOPs per image."""
    return images_per_s * train_gflop_per_image / 1e3 / world_size


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for training on a device: the GPU's free memory, or the host's available
    memory (MemAvailable) for a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024
