"""Exact resumption, stop signals, kills, broken checkpoints: real processes and real files."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    assert_same_run,
    cli_env,
    final_state,
    run_cli,
    run_torchrun,
    torchrun_cmd,
    wait_for_step,
)

from ddp_diffusion import checkpoint
from ddp_diffusion.checkpoint import CheckpointManager
from ddp_diffusion.errors import CheckpointError


def args(tiny_data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """A tiny run with dropout (global RNG) and LR warmup. The LR schedule is constant because
    the tests that stop at K by setting max_steps=K would otherwise change a cosine decay;
    the signal tests, which keep max_steps, use cosine."""
    return ["train", *TINY, f"data.root={tiny_data}", f"out_dir={out}",
            f"train.max_steps={steps}", "train.log_every=1", "train.warmup_steps=3",
            "model.dropout=0.1", *extra]


COSINE = ("train.lr_schedule=cosine", "train.min_lr_ratio=0.1")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bitwise_exact_single_process(tiny_data: Path, tmp_path: Path,
                                                precision: str) -> None:
    p = f"train.precision={precision}"
    run_cli(*args(tiny_data, tmp_path / "straight", 8, p))
    run_cli(*args(tiny_data, tmp_path / "resumed", 4, p, "train.ckpt_every=100"))
    proc = run_cli(*args(tiny_data, tmp_path / "resumed", 8, p, "train.ckpt_every=100"))
    assert "resuming from" in proc.stderr and "(step 4)" in proc.stderr
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_same_training_means_every_part_but_the_run_record(tiny_data: Path,
                                                          tmp_path: Path) -> None:
    """What assert_same_run checks: every checkpointed part, one added later included."""
    run_cli(*args(tiny_data, tmp_path / "a", 2))
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "a")
    b["progress"]["run_id"], b["world_size"], b["config"]["out_dir"] = "other", 7, "elsewhere"
    assert checkpoint.training_differences(a, b) == []  # the run's record, not its training
    b["optimizer"]["state"][0]["exp_avg"].view(-1)[0] += 1e-7
    b["progress"]["images_seen"] += 1
    assert [d.split(":")[0] for d in checkpoint.training_differences(a, b)] == [
        "checkpoint.optimizer.state.0.exp_avg", "checkpoint.progress.images_seen"]
    b["new_part"] = {}
    assert checkpoint.training_differences(a, b) == [
        "checkpoint: keys ['new_part'] in one only"]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_mid_run_saves_exits_75_and_resumes_exactly(tiny_data: Path,
                                                                  tmp_path: Path,
                                                                  stop: signal.Signals) -> None:
    run_cli(*args(tiny_data, tmp_path / "straight", 12, *COSINE))
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "ddp_diffusion",
           *args(tiny_data, out, 12, "train.ckpt_every=1000", *COSINE)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stderr=subprocess.PIPE, text=True)
    wait_for_step(out / "metrics.jsonl", 3, proc)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert f"stopped by {stop.name}" in err and "Traceback" not in err
    (stopped_at, _), = checkpoint.list_checkpoints(out / "checkpoints")
    assert 3 <= stopped_at < 12  # mid-run, not at a checkpoint boundary (ckpt_every=1000)
    run_cli(*args(tiny_data, out, 12, "train.ckpt_every=1000", *COSINE))
    assert_same_run(tmp_path / "straight", out)


THREE_RANKS = ("train.batch_size=24",)  # 8 a rank; 160 images: 6 steps an epoch, uneven


def test_a_second_ctrl_c_exits_at_once_with_one_line_and_keeps_the_checkpoints(
        tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*args(tiny_data, out, 4))
    saved = checkpoint.list_checkpoints(out / "checkpoints")
    # Resumed with no sync point in sight, so the first Ctrl-C's save is far off.
    quiet = ("train.ckpt_every=100000", "train.sync_every=100000", "train.log_every=100000")
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "ddp_diffusion",
                                 *args(tiny_data, out, 100000, *quiet)],
                                cwd=REPO, env=cli_env(), stderr=stderr, text=True)
        deadline = time.monotonic() + 300
        while "resuming from" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(1.0)  # training
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    err = log.read_text()
    assert err.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C); nothing more")
    assert "Traceback" not in err
    assert checkpoint.list_checkpoints(out / "checkpoints") == saved  # what was saved stays


@pytest.mark.slow
@pytest.mark.parametrize(("ranks", "extra"), [
    (2, ("train.precision=fp32",)),
    (2, ("train.precision=bf16",)),
    (3, ("train.precision=fp32", "train.deterministic=true", *THREE_RANKS)),
], ids=["2-fp32", "2-bf16", "3-fp32-deterministic"])
def test_resume_is_bitwise_exact_on_several_processes(tiny_data: Path, tmp_path: Path,
                                                      ranks: int, extra: tuple[str, ...]) -> None:
    run_torchrun(ranks, *args(tiny_data, tmp_path / "straight", 8, *extra))
    run_torchrun(ranks, *args(tiny_data, tmp_path / "resumed", 4, *extra, "train.ckpt_every=100"))
    run_torchrun(ranks, *args(tiny_data, tmp_path / "resumed", 8, *extra, "train.ckpt_every=100"))
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert final_state(tmp_path / "resumed")["world_size"] == ranks


@pytest.mark.slow
@pytest.mark.parametrize(("ranks", "extra"), [(2, ()), (3, THREE_RANKS)], ids=["2", "3"])
def test_signal_to_one_rank_stops_all_at_the_same_step(tiny_data: Path, tmp_path: Path,
                                                       ranks: int, extra: tuple[str, ...]
                                                       ) -> None:
    run_torchrun(ranks, *args(tiny_data, tmp_path / "straight", 12, *COSINE, *extra))
    out = tmp_path / "stopped"
    stopped_args = args(tiny_data, out, 12, "train.ckpt_every=1000", *COSINE, *extra)
    launcher = subprocess.Popen(torchrun_cmd(ranks, *stopped_args), cwd=REPO, env=cli_env(),
                                stderr=subprocess.PIPE, text=True)
    wait_for_step(out / "metrics.jsonl", 3, launcher)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
    pids = sorted(int(p) for p in workers.stdout.split())
    assert len(pids) == ranks
    os.kill(pids[-1], signal.SIGUSR1)  # only one rank hears it
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0, err[-3000:]
    assert err.count("exitcode  : 75") == ranks, err[-3000:]  # every rank saved and exited 75
    assert "stopped by SIGUSR1 at step" in err and "stopped by another rank's signal" in err
    (stopped_at, _), = checkpoint.list_checkpoints(out / "checkpoints")
    assert 3 <= stopped_at < 12
    run_torchrun(ranks, *stopped_args)
    assert_same_run(tmp_path / "straight", out)


@pytest.mark.slow
def test_sigkill_of_a_rank_under_max_restarts_recovers_exactly(tiny_data: Path,
                                                               tmp_path: Path) -> None:
    run_torchrun(2, *args(tiny_data, tmp_path / "straight", 14, "train.ckpt_every=4", *COSINE))
    out = tmp_path / "killed"
    launcher = subprocess.Popen(
        torchrun_cmd(2, *args(tiny_data, out, 14, "train.ckpt_every=4", *COSINE), max_restarts=1),
        cwd=REPO, env=cli_env(), stderr=subprocess.PIPE, text=True)
    wait_for_step(out / "metrics.jsonl", 6, launcher)
    pids = sorted(int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)],
                                                 capture_output=True, text=True).stdout.split())
    os.kill(pids[-1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-4000:]
    assert "resuming from" in err  # the restarted group came back from a checkpoint
    assert_same_run(tmp_path / "straight", out)


def test_a_checkpoint_of_the_first_format_still_resumes_exactly(tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    """Checkpoints written before format 2 (step, images seen and W&B id at the top level, LR
    schedule and RNG states saved, weights under `cfg.`) resume to the same result."""
    run_cli(*args(tiny_data, tmp_path / "straight", 8))
    out = tmp_path / "old"
    run_cli(*args(tiny_data, out, 4, "train.ckpt_every=100"))
    path = checkpoint.path_for(out / "checkpoints", 4)
    new = torch.load(path, weights_only=True)
    progress = new.pop("progress")
    old = {k: v for k, v in new.items() if k not in ("format", "data")}
    for part in ("model", "ema"):
        old[part] = {k.replace("cfguidance.", "cfg.", 1): v for k, v in new[part].items()}
    old.update(images_seen=progress["images_seen"], wandb_run_id=progress["run_id"],
               lr_schedule={"last_epoch": 4}, rng=[{"cpu": torch.get_rng_state()}],
               data_position={"epoch": 0, "batch_in_epoch": 4, "steps_per_epoch": 10})
    torch.save(old, path)
    proc = run_cli(*args(tiny_data, out, 8, "train.ckpt_every=100"))
    assert f"resuming from {path} (step 4)" in proc.stderr
    assert_same_run(tmp_path / "straight", out)
    assert final_state(out)["progress"]["run_id"] == progress["run_id"]


def test_truncated_newest_checkpoint_falls_back_to_previous(tiny_data: Path,
                                                            tmp_path: Path) -> None:
    run_cli(*args(tiny_data, tmp_path / "straight", 12, "train.ckpt_every=4"))
    out = tmp_path / "broken"
    run_cli(*args(tiny_data, out, 8, "train.ckpt_every=4"))
    newest = checkpoint.path_for(out / "checkpoints", 8)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    torn = newest.read_bytes()
    proc = run_cli(*args(tiny_data, out, 12, "train.ckpt_every=4"))
    assert f"skipping checkpoint {newest}: unreadable (truncated or corrupt)" in proc.stderr
    assert "(step 4)" in proc.stderr
    assert_same_run(tmp_path / "straight", out)
    # The torn file was moved aside before step 8 was written again, not overwritten.
    (kept,) = (out / "archive").glob("*/checkpoints/ckpt-00000008.pt")
    assert kept.read_bytes() == torn


def _without_config(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "config"}


def _with_unknown_key(state: dict) -> dict:
    return {**state, "config": {**state["config"], "train": {**state["config"]["train"],
                                                             "bogus": 1}}}


@pytest.mark.parametrize(("make", "reason"), [
    (lambda _: b"", "unreadable (truncated or corrupt): EOFError"),
    (lambda _: b"hello, I am a text file\n", "unreadable (truncated or corrupt): KeyError"),
    (_without_config, "not a ddp-diffusion checkpoint (no step, model or config)"),
    (_with_unknown_key, "its config does not fit this version"),
], ids=["empty", "text", "no-config", "unknown-config-key"])
def test_a_newest_checkpoint_of_any_shape_is_named_and_the_previous_one_resumed(
        tiny_data: Path, tmp_path: Path, make: Callable[[dict], object], reason: str) -> None:
    ckpt_dir = tmp_path / "run" / "checkpoints"
    run_cli(*args(tiny_data, tmp_path / "run", 4))
    good = checkpoint.path_for(ckpt_dir, 4)
    newest = checkpoint.path_for(ckpt_dir, 8)
    content = make(torch.load(good, weights_only=True))
    if isinstance(content, bytes):
        newest.write_bytes(content)
    else:
        torch.save(content, newest)
    plan = checkpoint.plan_resume("auto", ckpt_dir)
    assert plan.path == good and plan.move_aside == [newest]
    with pytest.raises(CheckpointError, match=re.escape(f"{newest}: {reason}")):
        checkpoint.read(newest)


class _RunsCode:
    """Unpickling this object would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "ckpt-00000001.pt"
    torch.save({"step": 1, "model": _RunsCode(marker)}, evil, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused, it holds objects other than tensors") as e:
        checkpoint.read(evil)
    assert not marker.exists()
    assert str(e.value).startswith(f"{evil}: ")


def test_changed_model_cannot_resume(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*args(tiny_data, out, 2))
    proc = run_cli(*args(tiny_data, out, 4, "model.channels=24"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: cannot resume from {checkpoint.path_for(out / 'checkpoints', 2)}: "
        "model.channels: 16 -> 24 changed, and that breaks resumption. Nothing was changed. Use "
        "a new out_dir, or train.resume=never to start a new run here (the old one moves to "
        "out_dir/archive/)")
    assert [s for s, _ in checkpoint.list_checkpoints(out / "checkpoints")] == [2]


def test_non_finite_loss_is_skipped_then_aborts(tiny_data: Path, tmp_path: Path) -> None:
    proc = run_cli(*args(tiny_data, tmp_path / "nan", 30, "train.lr=1e30", "train.grad_clip=0",
                         "train.max_nonfinite=3", "train.warmup_steps=0"), check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite loss or gradient, update skipped (1 in a row" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss was non-finite for 3 steps in a row")
    assert "train.lr" in last


class _Counter:
    """The smallest stateful part: one tensor."""

    def __init__(self) -> None:
        self.w = torch.zeros(2)

    def state_dict(self) -> dict:
        return {"w": self.w.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.w = state["w"].clone()


def test_retention_keeps_last_n_and_milestones_and_no_temp_files(tmp_path: Path) -> None:
    part = _Counter()
    manager = CheckpointManager(tmp_path, {"part": part}, keep_last=2, milestone_every=4)
    for step in range(1, 11):
        part.w.fill_(float(step))
        manager.save(step, {"model": {}, "config": {}})
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [4, 8, 9, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000004.pt", "ckpt-00000008.pt", "ckpt-00000009.pt", "ckpt-00000010.pt"]
    (_, state), _ = checkpoint.newest_readable(tmp_path)
    restored = _Counter()
    CheckpointManager(tmp_path, {"part": restored}, 2, 4).restore(state, "ckpt-00000010.pt")
    assert state["step"] == 10 and torch.equal(restored.w, torch.full((2,), 10.0))
