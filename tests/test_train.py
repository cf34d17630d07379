"""Training on one process: the loss falls, and a short run writes everything it should."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, TINY_MODEL, run_cli
from PIL import Image

from ddp_diffusion import checkpoint
from ddp_diffusion.config import DiffusionConfig, TrainConfig
from ddp_diffusion.data import Batch
from ddp_diffusion.diffusion import Diffusion, build_denoiser
from ddp_diffusion.train import apply_update, train_step


def test_train_step_overfits_one_batch() -> None:
    """The trainer's own step (forward, loss, backward, clip; then its update) drives the loss
    down, and reports the gradient norm from before clipping."""
    torch.manual_seed(0)
    diffusion = Diffusion(DiffusionConfig(steps=100, loss="mse"))
    denoiser = build_denoiser(TINY_MODEL, 100)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=3e-3, fused=True)  # as the trainer's
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x0 = torch.rand(8, 1, 32, 32) * 2 - 1
    batch = Batch(x0=x0, labels=torch.arange(8), t=torch.randint(0, 100, (8,)),
                  noise=torch.randn_like(x0), drop=torch.zeros(8, dtype=torch.bool),
                  keys=torch.arange(8))
    tc = TrainConfig(grad_clip=1.0)
    losses, norms, clipped = [], [], []
    for _ in range(60):
        loss, grad_norm = train_step(denoiser, contextlib.nullcontext, diffusion, [batch], opt,
                                     scaler, tc, "fp32")
        clipped.append(torch.nn.utils.get_total_norm(
            [p.grad for p in denoiser.parameters() if p.grad is not None]).item())
        apply_update(opt, scaler, skip=torch.tensor(False))  # no step here is non-finite
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        norms.append(grad_norm.item())
    # An untrained denoiser predicts zero noise (its output layer starts at zero), so the first
    # loss is the mean square of the noise drawn.
    assert losses[0] == pytest.approx(batch.noise.square().mean().item(), rel=1e-6)
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    # The norm reported is the one before clipping; the gradients the update used were clipped
    # to train.grad_clip (clip_grad_norm_ scales by 1 / (norm + 1e-6): exact to 1e-5).
    assert max(norms) > 2 * tc.grad_clip  # the clip bit
    for norm, after in zip(norms, clipped, strict=True):
        assert after == pytest.approx(min(norm, tc.grad_clip), rel=1e-5), (norm, after)


def test_short_run_writes_config_metrics_checkpoints_samples(tiny_data: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli("train", "--config", "configs/quickstart_cpu.yaml", *TINY, f"out_dir={out}",
            f"data.root={tiny_data}", "train.max_steps=20", "train.sample_every=20")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 20 and saved["model"]["channels"] == 16
    assert saved["data"]["root"] == str(tiny_data)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:
        assert {"loss", "lr", "images_per_s", "grad_norm", "ema_beta", "data_wait"} <= r.keys()
        assert r["data_wait"] == 0.0  # the memory loader never makes training wait
        assert r["images_per_s"] > 0 and r["loss"] > 0

    ckpts = checkpoint.list_checkpoints(out / "checkpoints")
    assert [s for s, _ in ckpts] == [10, 20]
    state = checkpoint.read(ckpts[-1][1])
    assert state["step"] == 20 and state["progress"]["images_seen"] == 20 * 16
    assert {"model", "ema", "optimizer", "grad_scaler", "config", "data", "progress",
            "versions", "world_size"} <= state.keys()
    assert state["data"]["num_images"] == 160 and len(state["data"]["fingerprint"]) == 32

    grid = Image.open(out / "samples" / "step-00000020.png")
    assert grid.size == (84 + 2 * 34 + 2, 10 * 34 + 2)  # 10 classes x 2 per class, labelled


@pytest.mark.parametrize(("sync_every", "first_sync_point"), [(1, 1), (4, 4)])
def test_time_limit_saves_and_stops_cleanly_at_the_next_sync_point(
        tiny_data: Path, tmp_path: Path, sync_every: int, first_sync_point: int) -> None:
    out = tmp_path / "run"
    proc = run_cli("train", "--config", "configs/quickstart_cpu.yaml", *TINY, f"out_dir={out}",
                   f"data.root={tiny_data}", "train.max_steps=1000", "train.ckpt_every=500",
                   f"train.sync_every={sync_every}",  # TINY logs every 5 steps
                   "train.time_limit_minutes=1e-6")  # 60 microseconds: up by the first step's end
    assert proc.returncode == 0 and "time_limit_minutes" in proc.stderr
    assert [s for s, _ in checkpoint.list_checkpoints(out / "checkpoints")] == [first_sync_point]


def test_profile_steps_write_an_operator_table_and_a_trace(tiny_data: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli("train", "--config", "configs/quickstart_cpu.yaml", *TINY, f"out_dir={out}",
            f"data.root={tiny_data}", "train.max_steps=6", "train.profile_steps=2")
    table = (out / "profile.txt").read_text()
    assert "Self CPU" in table and "aten::convolution_backward" in table
    trace = json.loads((out / "profile_trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::convolution_backward" in names and "ProfilerStep#3" in names
