"""What KeyedDropout costs in eager mode: aten ops (one kernel each) per forward, and time.

    python bench/dropout_kernels.py                      # writes docs/dropout_kernels.md/.json
    python bench/dropout_kernels.py --before old.json    # with an older commit's numbers beside

Counts the aten ops of one training forward of the recommended UNet (configs/fashion_mnist.yaml's
model section, 1 channel, 10 classes) with model.dropout 0 and 0.1, with a TorchDispatchMode;
the ops run inside each KeyedDropout layer are told apart with module hooks, and an op counts as
full-size when its output has as many elements as the layer's activation (the others work on
smaller tensors: the b per-sample keys, or one sample's positions). The first forward, which
may build per-layer tables, is counted apart from the steady state. Also times one
KeyedDropout layer on a (64, 128, 32, 32) float32 tensor (median of 20). `--before` takes the
JSON this script wrote on an older commit (run there, e.g. on a `git archive` of it with
PYTHONPATH pointing at it), and the page shows both. Writes OUT/dropout_kernels.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from train_throughput import machine  # bench/, beside this file

import ddp_diffusion.model
from ddp_diffusion import config
from ddp_diffusion.diffusion import build_denoiser
from ddp_diffusion.model import KeyedDropout

REPO = Path(__file__).resolve().parent.parent
RECOMMENDED = REPO / "configs" / "fashion_mnist.yaml"


class Counter(TorchDispatchMode):
    """Counts aten ops: all of them, and those run inside a KeyedDropout layer."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.dropout_ops = self.dropout_full = 0
        self.activation: int | None = None  # numel of the input of the layer being run

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if self.activation is not None:
            self.dropout_ops += 1
            self.dropout_full += isinstance(out, torch.Tensor) and out.numel() == self.activation
        return out

    def watch(self, model: nn.Module) -> list[Any]:
        """Hooks on the model's KeyedDropout layers that mark the ops they run (their handles)."""
        handles = []
        for m in model.modules():
            if isinstance(m, KeyedDropout):
                handles += [m.register_forward_pre_hook(
                                lambda _, inputs: setattr(self, "activation", inputs[0].numel())),
                            m.register_forward_hook(lambda *_: setattr(self, "activation", None))]
        return handles


def count_forward(model_cfg: config.ModelConfig, dropout: float, batch: int) -> dict[str, Any]:
    """Aten ops of a training forward, in all and in the dropout layers; and how many more the
    dropout layers ran in the first forward (one-time work such as tables)."""
    torch.manual_seed(0)
    model = build_denoiser(dataclasses.replace(model_cfg, dropout=dropout), 1000).train()
    size = model_cfg.image_size
    x = torch.randn(batch, model_cfg.in_channels, size, size)
    t = torch.randint(0, 1000, (batch,))
    labels = torch.randint(0, model_cfg.num_classes, (batch,))
    keys = torch.randint(0, 2**31, (batch,))  # as the data pipeline draws them
    counts = []
    for _ in range(2):  # the first forward, then the steady state
        counter = Counter()
        handles = counter.watch(model)
        with counter:
            model(x, t, labels, keys=keys)
        for h in handles:
            h.remove()
        counts.append(counter)
    first, steady = counts
    return {"dropout": dropout,
            "dropout_layers": sum(isinstance(m, KeyedDropout) and m.p > 0
                                  for m in model.modules()),
            "ops": steady.ops, "dropout_ops": steady.dropout_ops,
            "dropout_full_size_ops": steady.dropout_full,
            "dropout_ops_first_forward_extra": first.dropout_ops - steady.dropout_ops}


def time_layer(shape: tuple[int, ...], p: float, repeats: int) -> dict[str, Any]:
    """Median forward time of one KeyedDropout layer in training mode, after one warm-up."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    keys = torch.randint(0, 2**31, (shape[0],))
    layer = KeyedDropout(p, salt=1).train()
    layer(x, keys)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layer(x, keys)
        times.append(time.perf_counter() - start)
    return {"shape": list(shape), "p": p, "repeats": repeats, "threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0],  # other work on the machine skews these
            "median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3}


def code_label() -> str:
    """The commit whose ddp_diffusion/model.py was measured, or that commit plus edits."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout

    try:
        short = git("rev-parse", "--short", "HEAD").strip()
        committed = git("show", "HEAD:ddp_diffusion/model.py")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    measured = Path(ddp_diffusion.model.__file__).read_text()
    return short if measured == committed else f"{short} + uncommitted changes to model.py"


def per_layer(r: dict[str, Any]) -> dict[str, float]:
    """Dropout 0.1 against dropout 0: ops per forward and per dropout layer."""
    on, off = r["with_dropout"], r["without_dropout"]
    n = on["dropout_layers"]
    return {"off": off["ops"], "on": on["ops"], "layers": n,
            "per_layer": (on["ops"] - off["ops"]) / n,
            "full": on["dropout_full_size_ops"] / n,
            "tiny": (on["dropout_ops"] - on["dropout_full_size_ops"]) / n,
            "once": on["dropout_ops_first_forward_extra"] / n}


def markdown(result: dict[str, Any]) -> str:
    """The page: op counts and the layer time, with the older commit's where given."""
    m = result["machine"]
    runs = ([("before", result["before"])] if result.get("before") else []) + [("after", result)]
    lines = [
        "# KeyedDropout: aten ops and time in eager mode", "",
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} CPU cores, flags "
        f"{m['cpu_flags'] or 'none of avx2/avx512_bf16/amx_bf16'}, torch {m['torch']}) by "
        "`python bench/dropout_kernels.py`. Each aten op is a kernel launch in eager mode "
        "(torch.compile fuses them).", "",
        f"One training forward of the recommended UNet (`{result['config']}` model section, "
        f"{result['image_size']}x{result['image_size']}, 1 channel, 10 classes), batch "
        f"{result['batch']}, after a first forward (which builds any per-layer tables; those "
        "ops are in the last column):", "",
        "| code | ops, dropout 0 | ops, dropout 0.1 | dropout layers | extra ops per layer "
        "| of them on full-size activations | on smaller tensors | once, in the first forward |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in runs:
        d = per_layer(r)
        lines.append(f"| {name} ({r['code']}) | {d['off']} | {d['on']} | {d['layers']} | "
                     f"{d['per_layer']:g} | {d['full']:g} | {d['tiny']:g} | {d['once']:g} |")
    layer = result["layer"]
    lines += ["", f"One KeyedDropout layer (p = {layer['p']}) forward in training mode on a "
              f"{tuple(layer['shape'])} float32 tensor, median of {layer['repeats']} after a "
              f"warm-up, {layer['threads']} threads:", "",
              "| code | median ms | min ms | load average (1 min) after timing |",
              "|---|---:|---:|---:|"]
    for name, r in runs:
        load = r["layer"].get("load_average_1min")
        lines.append(f"| {name} ({r['code']}) | {r['layer']['median_ms']:.1f} | "
                     f"{r['layer']['min_ms']:.1f} | {'?' if load is None else f'{load:.1f}'} |")
    if result.get("before"):
        b = result["before"]["machine"]
        lines += ["", f"The before rows: measured {b['date']} on {b['cpu']} ({b['cores']} CPU "
                      f"cores, flags {b['cpu_flags']}, torch {b['torch']}) by this script run "
                      "on that commit's code."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=RECOMMENDED)
    p.add_argument("--batch", type=int, default=8, help="batch of the counted forwards")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--before", type=Path, help="this script's JSON from an older commit")
    p.add_argument("--out", type=Path, default=REPO / "docs")
    args = p.parse_args(argv)
    model_cfg = config.with_data_shape(config.load(args.config).model, 10, 1)
    result: dict[str, Any] = {
        "machine": machine(torch.device("cpu")), "code": code_label(),
        "config": args.config.name, "image_size": model_cfg.image_size, "batch": args.batch,
        "with_dropout": count_forward(model_cfg, 0.1, args.batch),
        "without_dropout": count_forward(model_cfg, 0.0, args.batch),
        "layer": time_layer((64, 128, 32, 32), 0.1, args.repeats)}
    if args.before:
        result["before"] = json.loads(args.before.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dropout_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "dropout_kernels.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
