"""The steady-state step never makes the host wait for the device: between sync points (log,
checkpoint, grid, FID, and the stop check every train.sync_every steps) a training step reads
no tensor value back, for every loss, loader, precision and world size, with model dropout on.

Counted by bench/host_reads.py (a dispatch mode counting `aten._local_scalar_dense`, which
`.item()`, `bool(t)` and `float(t)` run, plus every `tolist()`, `numpy()` and `cpu()`) over two
runs that differ only in length: every cadence lies beyond both, so the only sync point is the
last step and the two counts differ by exactly the reads of the steps in between. (Before
this was fixed, torchmultimodal's schedule lookups read ~12 values a step.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, cli_env, torchrun_cmd

SCRIPT = ("bench/host_reads.py",)
QUIET = ("train.sync_every=1000", "train.log_every=1000", "train.ckpt_every=1000",
         "model.dropout=0.1", "train.lr_schedule=cosine")


def host_reads(data: Path, out: Path, ranks: int, steps: int, *extra: str) -> list[dict]:
    """Each rank's host reads of a whole training run of `steps` steps, by kind."""
    args = [str(out / "reads.json"), "train", *TINY, f"data.root={data}", f"out_dir={out}",
            f"train.max_steps={steps}", *QUIET, *extra]
    cmd = (torchrun_cmd(ranks, *args, entry=SCRIPT) if ranks > 1
           else [sys.executable, *SCRIPT, *args])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"reads.rank{r}.json").read_text()) for r in range(ranks)]


# Every loss, loader, precision and world size appears at least once; 2 ranks also accumulate.
# fp16 has no native kernels on a CPU (~10 s a step here): a small batch and a short window.
@pytest.mark.parametrize(("ranks", "extra", "steps"), [
    (1, ("diffusion.loss=hybrid", "data.loader=memory", "train.precision=fp32"), (10, 20)),
    (1, ("diffusion.loss=mse", "data.loader=stream", "data.num_workers=2",
         "train.precision=bf16"), (10, 20)),
    (2, ("diffusion.loss=hybrid", "data.loader=stream", "data.num_workers=1",
         "train.precision=bf16", "train.grad_accum=2"), (10, 20)),
    (1, ("diffusion.loss=hybrid", "data.loader=memory", "train.precision=fp16",
         "train.batch_size=4"), (2, 6)),
], ids=["1-hybrid-memory-fp32", "1-mse-stream-bf16", "2-hybrid-stream-bf16-accum",
        "1-hybrid-memory-fp16"])
def test_steps_between_sync_points_read_nothing_back(tiny_data: Path, tmp_path: Path,
                                                     ranks: int, extra: tuple[str, ...],
                                                     steps: tuple[int, int]) -> None:
    short = host_reads(tiny_data, tmp_path / "short", ranks, steps[0], *extra)
    long = host_reads(tiny_data, tmp_path / "long", ranks, steps[1], *extra)
    for rank in range(ranks):
        # The counter is live: the final sync point reads the non-finite flags and the loss.
        assert short[rank].get("tolist", 0) >= 2, short[rank]
        assert long[rank] == short[rank], (rank, short[rank], long[rank])
