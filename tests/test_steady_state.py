"""The steady-state step: every logged row says how much of the chip it used, and the host
waits for the device only at sync points, without changing a single bit of the result."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    TINY_MODEL,
    assert_same_run,
    cli_env,
    run_cli,
    run_torchrun,
    set_loss_scale,
    trainer_in_process,
)
from torch.utils.flop_counter import FlopCounterMode

from ddp_diffusion import checkpoint, config
from ddp_diffusion.data import Batch
from ddp_diffusion.diffusion import Diffusion, build_denoiser
from ddp_diffusion.train import apply_update, train_step
from ddp_diffusion.utilisation import table_peak_tflops


def args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", *TINY, f"data.root={data}", f"out_dir={out}", f"train.max_steps={steps}",
            *extra]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- utilisation


def tiny_step_gflop_per_image() -> float:
    """GFLOP per image of one real training step of the TINY model, as torch counts them: the
    trainer's own train_step (forward, loss, backward) on a batch of 4 images."""
    cfg = config.load(None, TINY)
    torch.manual_seed(0)
    denoiser = build_denoiser(TINY_MODEL, cfg.diffusion.steps)
    opt = torch.optim.AdamW(denoiser.parameters())
    batch = Batch.zeros(4, (TINY_MODEL.in_channels, TINY_MODEL.image_size,
                            TINY_MODEL.image_size), torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        train_step(denoiser, contextlib.nullcontext, Diffusion(cfg.diffusion), [batch], opt,
                   torch.amp.GradScaler("cpu", enabled=False), cfg.train, "fp32")
    return counter.get_total_flops() / 4 / 1e9


def test_every_logged_row_carries_tflops_and_the_fraction_of_the_set_peak(
        tiny_data: Path, tmp_path: Path) -> None:
    run_cli(*args(tiny_data, tmp_path / "one", 10, "train.peak_tflops=0.25"))
    one = records(tmp_path / "one")
    for r in one:
        assert r["peak_fraction"] == pytest.approx(r["tflops"] / 0.25, rel=1e-9)
    # Two ranks: the images/s is global, the TFLOP/s per device; no peak known for a CPU.
    run_torchrun(2, *args(tiny_data, tmp_path / "two", 10))
    two = records(tmp_path / "two")
    assert two and all("peak_fraction" not in r for r in two)
    # Every row of both runs: TFLOP/s x devices / (images/s) is one number, the FLOPs of a
    # training image ...
    per_image = [1e3 * r["tflops"] * world / r["images_per_s"]
                 for rows, world in ((one, 1), (two, 2)) for r in rows]
    assert len(per_image) == 4 and per_image == pytest.approx([per_image[0]] * 4, rel=1e-9)
    # ... the FLOPs a training step really does per image. The trainer counts 3x the forward
    # once (the backward computes gradients of activations and of weights); torch's count of a
    # real step lacks only the input gradients of the two layers fed by data, the stem
    # convolution and the time embedding's first linear layer: 2 * (9*16*32^2 + 16*64) FLOP of
    # 0.39 GFLOP per image, 0.08%.
    assert per_image[0] == pytest.approx(tiny_step_gflop_per_image(), rel=1e-3)


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0),  # not the SXM part's number
    ("NVIDIA H200", "fp32", 494.5),  # TF32: half
    ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.0),  # not the L4's
    ("Tesla T4", "fp16", None),  # not listed: the log asks for train.peak_tflops
])
def test_the_gpu_peak_table_matches_whole_model_names(name: str, precision: str,
                                                       peak: float | None) -> None:
    assert table_peak_tflops(name, precision) == peak


# ----------------------------------------------------------------------- skipping on the device


def tiny_optimizer() -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    apply_update(opt, torch.amp.GradScaler("cpu", enabled=False), torch.tensor(False))
    return model, opt


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t.clone() for p in model.parameters()
            for t in (p, *opt.state[p].values())]


def test_a_skipped_update_changes_no_weight_moment_or_step_count() -> None:
    model, opt = tiny_optimizer()
    before = snapshot(model, opt)
    apply_update(opt, torch.amp.GradScaler("cpu", enabled=False), torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model, opt), strict=True))
    apply_update(opt, torch.amp.GradScaler("cpu", enabled=False), torch.tensor(False))
    after = snapshot(model, opt)
    assert not any(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_an_fp16_overflow_is_skipped_and_lowers_the_loss_scale(tiny_data: Path,
                                                              tmp_path: Path) -> None:
    """The trainer's own step in fp16: one whose scaled gradients overflow changes no weight,
    optimizer moment or EMA weight, halves the loss scale, and is routine (not counted towards
    a divergence)."""
    with trainer_in_process(f"data.root={tiny_data}", f"out_dir={tmp_path / 'run'}",
                            "train.precision=fp16") as trainer:
        set_loss_scale(trainer.scaler, 1.0)  # a first step that cannot overflow: moments exist
        loss, grad_norm, skip = trainer.train_one_step()
        assert torch.isfinite(grad_norm) and not skip

        def state() -> list[torch.Tensor]:
            return [t.clone() for t in (*trainer.model.state_dict().values(),
                                        *trainer.ema.module.state_dict().values(),
                                        *(v for s in trainer.opt.state.values()
                                          for v in s.values()))]

        before = state()
        set_loss_scale(trainer.scaler, 2.0 ** 40)  # x a loss of ~1: far beyond fp16's 65504
        loss, grad_norm, skip = trainer.train_one_step()
        assert torch.isfinite(loss) and not torch.isfinite(grad_norm) and skip
        after = state()
        assert len(after) == len(before) and all(
            torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert trainer.scaler.get_scale() == 2.0 ** 39
        assert trainer.progress.step == 2  # the step happened; it changed nothing
        assert trainer.nonfinite.read(2, max_streak=1) is None and trainer.nonfinite.total == 0


# ----------------------------------------------------------------------------- sync points


def nonfinite_report(stderr: str) -> list[str]:
    """The non-finite warnings and the final error line of a run, without their timestamps."""
    lines = re.findall(r"step \d+: non-finite loss.*", stderr)
    return [*lines, stderr.strip().splitlines()[-1]]


def test_non_finite_steps_are_reported_at_sync_points_exactly_as_a_per_step_check_would(
        tiny_data: Path, tmp_path: Path) -> None:
    blow_up = ("train.lr=1e30", "train.grad_clip=0", "train.max_nonfinite=3")
    every_step = run_cli(*args(tiny_data, tmp_path / "a", 30, *blow_up, "train.sync_every=1",
                               "train.log_every=1"), check=False)
    delayed = run_cli(*args(tiny_data, tmp_path / "b", 30, *blow_up, "train.sync_every=8",
                            "train.log_every=8"), check=False)
    assert every_step.returncode == delayed.returncode == 3
    report = nonfinite_report(every_step.stderr)
    assert len(report) == 4 and "3 steps in a row" in report[-1], report
    assert nonfinite_report(delayed.stderr) == report


# The trainer, sending itself SIGTERM right after the step given as the first argument: a real
# signal at a known step, where one from outside lands wherever the trainer happens to be.
SIGNAL_AFTER_STEP = """
import os, signal, sys
from ddp_diffusion import cli, train

one_step = train.Trainer.train_one_step

def one_step_then_signal(self):
    out = one_step(self)
    if self.progress.step == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGTERM)
    return out

train.Trainer.train_one_step = one_step_then_signal
raise SystemExit(cli.main(sys.argv[2:]))
"""


def test_a_stop_signal_is_honoured_at_the_next_sync_point_and_resumes_exactly(
        tiny_data: Path, tmp_path: Path) -> None:
    cosine = ("train.lr_schedule=cosine", "train.min_lr_ratio=0.1", "train.ckpt_every=1000")
    # The reference reads back every step; the stopped runs only every 4 steps and log every 3:
    # their sync points are 3, 4, 6, 8, 9, 12, ... Steps 5 and 7 are none, so a signal that
    # lands in them is read at the next step, a log step (6) or a sync_every step (8).
    run_cli(*args(tiny_data, tmp_path / "straight", 24, *cosine, "train.sync_every=1",
                  "train.log_every=1"))
    for signalled_after, sync_point in ((5, 6), (7, 8)):
        out = tmp_path / f"stopped-{signalled_after}"
        sparse = args(tiny_data, out, 24, *cosine, "train.sync_every=4", "train.log_every=3")
        proc = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_STEP, str(signalled_after),
                               *sparse], cwd=REPO, env=cli_env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 75, proc.stderr[-3000:]
        assert (f"stopped by SIGTERM at step {sync_point} after saving a checkpoint"
                in proc.stderr), proc.stderr[-3000:]
        assert [s for s, _ in checkpoint.list_checkpoints(out / "checkpoints")] == [sync_point]
        assert [r["step"] for r in records(out)] == [3, 6]
    run_cli(*sparse)  # the run stopped at 8 goes on to 24 as if it had never stopped
    assert_same_run(tmp_path / "straight", out)
