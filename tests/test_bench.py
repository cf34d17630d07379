"""The benchmark scripts: they run, and what they write means what it says."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, assert_same_run, cli_env, run_cli
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from ddp_diffusion import checkpoint, config, fid
from ddp_diffusion.data import Batch
from ddp_diffusion.diffusion import Diffusion, build_denoiser
from ddp_diffusion.runs import load_run
from ddp_diffusion.train import train_step
from ddp_diffusion.utilisation import achieved_tflops

sys.path.insert(0, str(REPO / "bench"))
from codealong import CodeAlong  # bench/ holds scripts, not a package


def test_train_throughput_quick_emits_json(tiny_data: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--quick", "--steps", "2", "--batch-size",
         "8", "--data-root", str(tiny_data), "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "train_throughput_cpu.json").read_text())
    names = [v["variant"] for v in result["variants"]]
    assert names == ["codealong", "ours fp32"]
    # Both run the code-along's network: the FLOPs per image of the trainer's own step on it,
    # and the rate the trainer would log (as TFLOP/s) at their images/s.
    gflop = seed_step_gflop_per_image()
    for v in result["variants"]:
        assert v["steps_timed"] == 2 and v["batch_size"] == 8
        assert v["min"] <= v["images_per_s"] <= v["max"] and v["images_per_s"] > 0
        assert v["train_gflop_per_image"] == pytest.approx(gflop, rel=1e-9)
        assert v["achieved_gflops"] == pytest.approx(
            1e3 * achieved_tflops(v["images_per_s"], gflop, world_size=1), rel=1e-9)
        assert v["peak_rss_mb"] > 100  # a process that holds torch and a 13.6M-param model
    assert result["speedup"] == pytest.approx(result["variants"][1]["images_per_s"]
                                              / result["variants"][0]["images_per_s"])
    assert result["peak_gflops"]["fp32"] > 0 and result["peak_gflops"]["bf16"] > 0
    table = (tmp_path / "train_throughput_cpu.md").read_text()
    assert "| codealong | 8 |" in table and "| ours fp32 | 8 |" in table


def seed_step_gflop_per_image() -> float:
    """GFLOP per image of one step of the trainer's train_step (forward, loss, backward) on the
    code-along's network (configs/seed.yaml), as torch's FlopCounterMode counts them."""
    cfg = config.load(REPO / "configs" / "seed.yaml")
    model = build_denoiser(config.with_data_shape(cfg.model, 10, 1), cfg.diffusion.steps)
    batch = Batch.zeros(2, (1, cfg.model.image_size, cfg.model.image_size), torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        train_step(model, contextlib.nullcontext, Diffusion(cfg.diffusion), [batch],
                   torch.optim.AdamW(model.parameters()),
                   torch.amp.GradScaler("cpu", enabled=False), cfg.train, "fp32")
    return counter.get_total_flops() / 2 / 1e9


def test_sync_every_bench_times_each_value_over_the_logged_intervals(tiny_data: Path,
                                                                     tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/sync_every.py", "--data-root", str(tiny_data), "--ranks", "1",
         "--values", "1,3", "--steps", "9", "--log-every", "3", "--rounds", "2",
         "--out", str(tmp_path), "--set", *TINY],
        capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "sync_every_cpu.json").read_text())
    assert [r["sync_every"] for r in result["rows"]] == [1, 3]
    for r in result["rows"]:
        assert len(r["samples"]) == 2 * 2  # 2 rounds x the intervals after the first of 3
        assert r["min"] <= r["images_per_s"] <= r["max"] and r["min"] > 0
    table = (tmp_path / "sync_every_cpu.md").read_text()
    assert "| 3 |" in table and f"flags {result['machine']['cpu_flags']}" in table


def test_codealong_run_loads_as_our_denoiser_with_identical_outputs(tiny_data: Path,
                                                                    tmp_path: Path) -> None:
    """The baseline's saved run is evaluated by our fid/sample code: the weights must map 1:1."""
    torch.manual_seed(0)
    ref = CodeAlong(str(tiny_data), torch.device("cpu"), batch_size=8, num_workers=0)
    assert torch.isfinite(torch.tensor(ref.step()))
    ref.save_run(tmp_path / "ref", step=1)
    cfg, denoiser, _, step, _ = load_run(tmp_path / "ref", None, True, torch.device("cpu"))
    assert step == 1 and cfg.model.name == "seed_unet"

    xt, t, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 10, 500, 999]), torch.arange(4)
    guided = ref.model.model.eval()  # the code-along's CFGuidance (guidance 2.0)
    with torch.no_grad():
        theirs = guided(xt, t, {"context": ref.encoder(y)})
        ours = denoiser.guided(guided.guidance).eval()(xt, t, denoiser.condition(y))
    torch.testing.assert_close(ours.prediction, theirs.prediction, rtol=0, atol=0)
    torch.testing.assert_close(ours.variance_value, theirs.variance_value, rtol=0, atol=0)


def test_fid_at_budget_pack_keeps_config_step_and_ema_weights(tiny_data: Path,
                                                              tmp_path: Path) -> None:
    """`pack` shrinks both runs to fp16 EMA weights that our loaders read back."""
    runs, packed = tmp_path / "runs", tmp_path / "packed"
    run_cli("train", "--config", "configs/quickstart_cpu.yaml", *TINY, f"out_dir={runs / 'ours'}",
            f"data.root={tiny_data}", "train.max_steps=10")
    CodeAlong(str(tiny_data), torch.device("cpu"), batch_size=8, num_workers=0).save_run(
        runs / "codealong", step=3)
    proc = subprocess.run([sys.executable, "bench/fid_at_budget.py", "pack", "--runs", str(runs),
                           "--to", str(packed)], capture_output=True, text=True, cwd=REPO,
                          env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, step in (("ours", 10), ("codealong", 3)):
        full = checkpoint.newest_readable(runs / name / "checkpoints")[0][1]
        path, small = checkpoint.newest_readable(packed / name / "checkpoints")[0]
        assert small["step"] == step and small["config"] == full["config"]
        assert all(v.dtype == torch.float16 for v in small["ema"].values() if v.is_floating_point())
        assert path.stat().st_size < 0.6 * full_size(runs / name)
        denoiser = load_run(packed / name, None, True, torch.device("cpu")).denoiser
        for k, v in denoiser.state_dict().items():
            torch.testing.assert_close(v, full["ema"][k].float(), rtol=1e-3, atol=1e-4)


def full_size(run: Path) -> int:
    """Bytes of a run's newest checkpoint."""
    return checkpoint.list_checkpoints(run / "checkpoints")[-1][1].stat().st_size


def test_loader_benchmark_measures_delivery_training_and_waiting(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "bench/loader_throughput.py", "--images", "300",
                           "--workers", "1", "--loader-steps", "2", "--train-steps", "2",
                           "--train-batch", "4", "--work", str(tmp_path / "work"), "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                          env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "loader_throughput.json").read_text())
    assert len(list((tmp_path / "work" / "jpegs-300").rglob("*.jpg"))) == 300
    assert result["per_worker"] == result["loader_images_per_s"]["1"] > 0
    for loader in ("memory", "stream"):
        rate, wait = result["training"][loader]
        assert rate > 0 and 0 <= wait < 1
    assert result["training"]["memory"][1] == 0  # nothing to wait for: all on the device
    assert result["workers_per_gpu"] == math.ceil(result["gpu_images_per_s"]
                                                  / result["per_worker"])
    assert result["model_gflop"] == pytest.approx(11.85, rel=0.01)  # image_folder.yaml's UNet
    assert "| 1 | " in (tmp_path / "loader_throughput.md").read_text()


def test_fid_vs_steps_quick_page_has_the_floor_the_seed_spread_and_a_plot_per_guidance(
        tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_cli("train", *TINY, f"out_dir={run}", f"data.root={tiny_data}", "train.max_steps=5")
    proc = subprocess.run(
        [sys.executable, "bench/fid_vs_steps.py", "--run", str(run), "--quick", "--num-samples",
         "20", "--batch-size", "10", "--seeds", "2", "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "out" / "evaluation.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 5 * 2  # header, then 5 quick configurations x guidance 0 and 2
    assert "- floor: 20 real test images score FID " in page
    seeded = [r for r in rows if "(2 seeds)" in r]
    assert [r.split(" | ")[0] for r in seeded] == ["| sde-dpm++"] * 2  # the headline row only
    assert Image.open(tmp_path / "out" / "fid_vs_steps.png").size == (1100, 380 * 2 + 60)


def test_fid_protocol_scores_reconstructed_lengths_and_prefixes_as_the_fid_command_does(
        tiny_data: Path, tmp_path: Path) -> None:
    """ema: a row per length beside the half-life EMA and the raw weights, tracked lengths
    rebuilt exactly; stability: the FID and KID of a seed's first n images are those of
    `fid --num-samples n` with that seed (the prefix is that set), and the floor is real_fid's."""
    run, out = tmp_path / "run", tmp_path / "out"
    run_cli("train", *TINY, f"out_dir={run}", f"data.root={tiny_data}", "train.max_steps=12",
            "train.ema_posthoc=true", "train.ema_posthoc_every=4")
    for part in ("ema", "stability"):
        proc = subprocess.run([sys.executable, "bench/fid_protocol.py", part, "--run", str(run),
                               "--quick", "--out-dir", str(out)],
                              capture_output=True, text=True, cwd=REPO, env=cli_env(),
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    ema = json.loads((out / "fid_ema.json").read_text())
    assert [r["weights"] for r in ema["rows"]] == ["half-life EMA", "raw weights",
                                                   "sigma_rel 0.05", "sigma_rel 0.1"]
    assert ema["about"]["snapshots"] == [4, 8, 12]
    assert all(r["profile_error"] < 1e-6 for r in ema["rows"][2:])  # tracked: exact
    assert len({r["samples_sha256"] for r in ema["rows"]}) == 4  # four different weights
    page = (out / "fid_ema.md").read_text().splitlines()
    assert len([x for x in page if x.startswith("| ") and "---" not in x]) == 1 + 4

    stab = json.loads((out / "fid_stability.json").read_text())
    assert [(r["seed"], r["num_samples"]) for r in stab["rows"]] == [
        (0, 40), (0, 80), (1, 40), (1, 80)]
    command = json.loads(run_cli(
        "fid", "--run", str(run), "--num-samples", "40", "--batch-size", "20", "--steps", "3",
        "--seed", "1", "--data-root", str(tiny_data)).stdout)
    row = stab["rows"][2]
    assert row["fid"] == pytest.approx(command["fid"], rel=1e-9)
    assert row["kid"] == pytest.approx(command["kid"], rel=1e-9)
    assert (row["precision"], row["recall"]) == (command["precision"], command["recall"])
    assert stab["rows"][0]["fid"] != row["fid"]  # another seed, other images
    cfg = load_run(run, None, True, torch.device("cpu")).cfg
    floor = fid.real_fid(cfg, dataclasses.replace(cfg.fid, num_samples=40), "test")["fid"]
    assert stab["about"]["floors"]["40"] == pytest.approx(floor, rel=1e-12)


def test_export_memory_reads_the_exports_memory_beside_its_chunks_and_checks_the_npz(
        tmp_path: Path) -> None:
    """bench/export_memory.py --quick: for each count, the process's memory while its chunks were
    written and after, the peak, and the .npz read back in the ADM layout."""
    proc = subprocess.run([sys.executable, "bench/export_memory.py", "--quick", "--work",
                           str(tmp_path / "work"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, env=cli_env(2), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "export_memory.json").read_text())
    assert [r["num_samples"] for r in result["rows"]] == [300, 1200]
    for r in result["rows"]:
        n = r["num_samples"]
        assert r["npz"] == {"arr_0": [[n, 32, 32, 3], "uint8"], "arr_1": [[n], "int64"]}
        assert r["chunks"] == n // 20 and r["chunks_seen"] <= r["chunks"]
        assert r["hold_mib"] == n * 32 * 32 * 3 / 2**20
        # RSS read while the chunks were written never exceeds the kernel's own peak
        assert all(0 < lo <= hi <= r["peak_rss_mib"] + 1
                   for lo, hi in r["rss_min_max_by_tenth_mib"])
    assert result["rows"][1]["chunks_seen"] > 0 and result["rows"][1]["rss_min_max_by_tenth_mib"]
    assert not list((tmp_path / "work").glob("samples-*"))  # each export removed after reading
    assert "| 1,200 | 4 |" in (tmp_path / "export_memory.md").read_text()


@pytest.mark.slow
def test_chaos_kills_of_every_kind_end_bitwise_equal_to_a_straight_run(tmp_path: Path) -> None:
    """bench/chaos.py with one kill of each kind (rank or whole job, SIGKILL or SIGTERM), aimed
    at training steps, a checkpoint write and a sample grid."""
    proc = subprocess.run(
        [sys.executable, "bench/chaos.py", "--kills", "4", "--seed", "1", "--work",
         str(tmp_path / "work"), "--out-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "chaos.json").read_text())
    assert sorted(k["kind"] for k in result["kills"]) == [
        "job-kill", "job-term", "rank-kill", "rank-term"]
    assert result["launches"] == 3  # the first, and one after each job-level kill
    assert_same_run(tmp_path / "work" / "straight", tmp_path / "work" / "chaos")
    run = tmp_path / "work" / "chaos"
    assert not list(run.rglob(".*.tmp-*"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, result["steps"] + 1))
