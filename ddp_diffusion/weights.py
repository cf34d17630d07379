"""Weights to hand over: a run's network as one safetensors file (tensors only, no code, no
optimizer or progress), with what is needed to sample from it as metadata, and read back as a
run that `sample` and `fid` use without its directory. safetensors is imported only here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ddp_diffusion import files
from ddp_diffusion.config import Config, from_dict, to_dict
from ddp_diffusion.errors import UserError
from ddp_diffusion.runs import Run, run_with

FORMAT = "ddp-diffusion-weights/1"
# Config keys that are paths on the machine that trained it: never written into a file that is
# handed to someone else (fid takes its own paths from its flags).
LOCAL_KEYS = {"data": ("root", "path", "debian_dir", "download"),
              "fid": ("inception_weights", "ref_stats")}
SECTIONS = ("model", "diffusion", "data", "sample", "fid")


def portable_config(cfg: Config) -> dict[str, Any]:
    """The sections of a config that say how to sample and evaluate, without local paths."""
    full = to_dict(cfg)
    return {s: {k: v for k, v in full[s].items() if k not in LOCAL_KEYS.get(s, ())}
            for s in SECTIONS}


def write(run: Run, source: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write the run's denoiser weights (CPU tensors) and metadata to `out`, whole or
    not at all; what was written."""
    from safetensors.torch import save

    # Copies: the guidance wrapper's train and eval null embeddings share one tensor, which
    # safetensors refuses to store twice (load_state_dict fills both from the two copies).
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
               for k, v in run.denoiser.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(portable_config(run.cfg)),
                "class_names": json.dumps(list(run.class_names)), "step": str(run.step),
                "source": json.dumps(source)}
    data = save(tensors, metadata)
    files.write_atomic(out, lambda f: f.write(data))
    return {"out": str(out), "step": run.step, **source, "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def read(path: Path, device: torch.device) -> Run:
    """A weights file as a run (config, denoiser on `device`, diffusion, step, class names), or
    a one-line UserError saying what is wrong with the file."""
    from safetensors import SafetensorError, safe_open

    what = f"--weights {path}"
    if not path.is_file():
        raise UserError(f"{what}: no such file; write one with ddp-diffusion export --run RUN "
                        "--out model.safetensors")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{what} cannot be read as safetensors ({e})") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{what} holds no ddp-diffusion metadata (format "
                        f"{metadata.get('format')!r}, not {FORMAT!r}); write it with "
                        "ddp-diffusion export")
    try:
        cfg = from_dict(json.loads(metadata["config"]))
        names = tuple(json.loads(metadata["class_names"]))
        step = int(metadata["step"])
    except (KeyError, ValueError, UserError) as e:
        raise UserError(f"{what}: its metadata is damaged ({e}); export it again") from None
    return run_with(cfg, tensors, step, names, device,
                    f"{what} does not fit the model its metadata describes", "export it again")
