"""DDP under real torchrun (gloo) against one process, gradient accumulation, and the
deterministic-kernels switch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import TINY, final_state, max_weight_diff, run_cli, run_torchrun

from ddp_diffusion import checkpoint, distributed

# Two ranks average their gradients with an all-reduce while one process averages over the
# whole batch in one reduction: the same math in a different summation order, so fp32 results
# differ by rounding (~1e-7 relative per step), which Adam's normalisation can amplify for
# near-zero gradients. After 6 steps at lr 1e-3 we allow 1e-5 absolute on weights of size ~0.1.
ATOL = 1e-5


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    """Six steps with model dropout: its masks are drawn per sample, so they do not depend on
    the world size or the micro-batching either."""
    return ["train", *TINY, f"data.root={data}", f"out_dir={out}", "train.max_steps=6",
            "train.log_every=1", "model.dropout=0.2", *extra]


@pytest.mark.slow
def test_two_rank_ddp_matches_one_process(tiny_data: Path, tmp_path: Path) -> None:
    # The one-process run keeps a checkpoint of every step (that changes no draw of training).
    run_cli(*_args(tiny_data, tmp_path / "one", "train.ckpt_every=1", "train.keep_last=0"))
    proc = run_torchrun(2, *_args(tiny_data, tmp_path / "two"))
    assert "world size 2" in proc.stderr
    diff = max_weight_diff(tmp_path / "one", tmp_path / "two")
    assert diff < ATOL, diff
    # ... while training moved the weights far more than that from its first step to its last.
    saved = checkpoint.list_checkpoints(tmp_path / "one" / "checkpoints")
    assert [step for step, _ in saved] == [1, 2, 3, 4, 5, 6]
    first, last = (checkpoint.read(path)["model"] for _, path in (saved[0], saved[-1]))
    moved = max((last[k] - first[k]).abs().max().item() for k in first)
    assert moved > 100 * ATOL, moved


@pytest.mark.slow
def test_a_global_batch_the_ranks_cannot_split_is_one_line_and_exit_2_on_every_rank(
        tiny_data: Path, tmp_path: Path) -> None:
    proc = run_torchrun(2, *_args(tiny_data, tmp_path / "odd", "train.batch_size=15"),
                        check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's code for a failed worker
    message = ("error: train.batch_size=15 is not divisible by world size 2 x train.grad_accum "
               "1; choose a multiple of 2\n")
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]  # from each rank ...
    assert proc.stderr.count("exitcode  : 2 ") == 2, proc.stderr[-3000:]  # ... with code 2
    assert not (tmp_path / "odd").exists()  # refused before the run directory was made


def test_gradient_accumulation_equals_full_batch(tiny_data: Path, tmp_path: Path) -> None:
    run_cli(*_args(tiny_data, tmp_path / "full"))
    run_cli(*_args(tiny_data, tmp_path / "accum", "train.grad_accum=2"))
    diff = max_weight_diff(tmp_path / "full", tmp_path / "accum")
    assert diff < ATOL, diff
    full, accum = final_state(tmp_path / "full"), final_state(tmp_path / "accum")
    assert full["progress"]["images_seen"] == accum["progress"]["images_seen"] == 6 * 16


def test_train_deterministic_switches_every_source_of_kernel_nondeterminism(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        distributed.set_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        distributed.set_determinism(False)  # the default: autotuned, atomics allowed
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
