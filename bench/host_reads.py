"""Run `ddp-diffusion ARGS` and count the host's reads of tensor values (each one a wait for the
device on a GPU): `aten._local_scalar_dense` (what `.item()`, `bool(t)`, `float(t)` and
`if t:` run), seen by a dispatch mode, and every `Tensor.tolist()`, `.numpy()` and `.cpu()`.

    python bench/host_reads.py OUT.json ARGS...   (under torchrun too: OUT.rank<R>.json each)

On a CPU the host and the device are one, so these calls cost nothing there; counting them is
the proxy for a GPU's syncs. On a GPU the file also has `cuda_syncs`: the synchronizing CUDA
calls that `torch.cuda.set_sync_debug_mode("warn")` reports. DataLoader workers are other
processes: what they read is not counted (it never waits for the device).

The steady-state step's count is the difference of two runs that differ only in length, with
every sync point but the last step beyond both (tests/test_host_reads.py, bench/gpu_check.py).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts the host reads made while it is active, by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts["item"] += 1
        return func(*args, **(kwargs or {}))


def count_method_calls(mode: HostReads) -> None:
    """Count Tensor.tolist/numpy/cpu calls of this process (main thread or not) in `mode`."""
    main_pid = os.getpid()
    for name in ("tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: Any, _name: str = name, _orig: Any = original,
                    **k: Any) -> Any:
            if os.getpid() == main_pid:  # not in a forked DataLoader worker
                mode.counts[_name] += 1
            return _orig(self, *a, **k)

        setattr(torch.Tensor, name, counted)


def main() -> int:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    from ddp_diffusion.cli import main as cli_main

    mode = HostReads()
    count_method_calls(mode)
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
        warnings.simplefilter("always")  # every synchronizing call, not once per place
        shown = warnings.showwarning

        def count_syncs(message: Any, *a: Any, **k: Any) -> None:
            if "synchronizing CUDA operation" in str(message):
                mode.counts["cuda_syncs"] += 1
            else:
                shown(message, *a, **k)

        warnings.showwarning = count_syncs
    with mode:
        code = cli_main(args)
    rank = os.environ.get("RANK", "0")
    out.with_name(f"{out.stem}.rank{rank}{out.suffix}").write_text(json.dumps(dict(mode.counts)))
    return code


if __name__ == "__main__":
    sys.exit(main())
