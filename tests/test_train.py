"""Training on one process: the loss falls, and a short run writes everything it should."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from conftest import TINY, run_cli
from PIL import Image

from ddp_diffusion import checkpoint
from ddp_diffusion.config import DiffusionConfig, ModelConfig
from ddp_diffusion.diffusion import Diffusion
from ddp_diffusion.model import build_denoiser


def test_loss_falls_when_overfitting_one_batch() -> None:
    torch.manual_seed(0)
    diffusion = Diffusion(DiffusionConfig(steps=100, loss="mse"))
    denoiser = build_denoiser(ModelConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1,
                                          attention_resolutions=[]), 100)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=3e-3)
    x0 = torch.rand(8, 1, 32, 32) * 2 - 1
    noise, t, labels = torch.randn_like(x0), torch.randint(0, 100, (8,)), torch.arange(8)
    losses = []
    for _ in range(60):
        xt = diffusion.q_sample(x0, noise, t)
        loss = diffusion.loss(denoiser(xt, t, labels), x0, xt, noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.5
    assert losses[-1] < 0.2 * losses[0], losses[::10]


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
        assert {"loss", "lr", "images_per_s", "grad_norm", "ema_beta"} <= r.keys()
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


def test_time_limit_saves_and_stops_cleanly(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("train", "--config", "configs/quickstart_cpu.yaml", *TINY, f"out_dir={out}",
                   f"data.root={tiny_data}", "train.max_steps=1000", "train.ckpt_every=500",
                   "train.time_limit_minutes=1e-6")  # 60 microseconds: stops after step 1
    assert proc.returncode == 0 and "time_limit_minutes" in proc.stderr
    assert [s for s, _ in checkpoint.list_checkpoints(out / "checkpoints")] == [1]


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
