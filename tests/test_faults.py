"""Faults and operator mistakes, reproduced for real: what the trainer must do when they happen.

Real processes, real files, real signals, a real full tmpfs. Every case here was reproduced on
the main of issue 10 (quickstart config, small batch), where it lost checkpoints, trained from
zero, ignored a setting or ended in a traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    assert_same_run,
    cli_env,
    final_state,
    launch,
    max_weight_diff,
    run_cli,
    torchrun_cmd,
    wait_for_step,
)

from ddp_diffusion import checkpoint
from ddp_diffusion.checkpoint import path_for

ATOL = 1e-5  # as in test_distributed: the same math summed in another order


def train_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """A tiny run that logs every step and saves every 2 steps."""
    return ["train", *TINY, f"data.root={data}", f"out_dir={out}", f"train.max_steps={steps}",
            "train.log_every=1", "train.ckpt_every=2", *extra]


def steps_in(out: Path) -> list[int]:
    return [s for s, _ in checkpoint.list_checkpoints(out / "checkpoints")]


def metrics_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def last_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def last_line_of(stderr: Path) -> str:
    """The last line a background trainer wrote to its stderr file (no traceback before it)."""
    text = stderr.read_text()
    assert "Traceback" not in text, text[-3000:]
    return text.strip().splitlines()[-1]


def start(args: list[str], stderr: Path, **env: str) -> subprocess.Popen:
    """Start the trainer in the background, its stderr going to a file."""
    with stderr.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "ddp_diffusion", *args], cwd=REPO,
                                env={**cli_env(), **env}, stderr=f, stdout=subprocess.DEVNULL)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until `text` appears in the file a background process writes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{path.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen in {timeout} s:\n{path.read_text()[-3000:]}")


def snapshot(folder: Path) -> dict[str, object]:
    """Every path under a folder with its bytes (or 'dir', or a link's target) and mtime; the
    lock file aside, which records who holds the run and changes with every attempt."""
    def content(p: Path) -> object:
        return (f"link to {os.readlink(p)}" if p.is_symlink() else p.read_bytes() if p.is_file()
                else "dir")

    return {str(p.relative_to(folder)): (content(p), p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.name != "train.lock"}


# ----------------------------------------------------------------------------- checkpoints kept


def test_a_fresh_start_moves_the_earlier_run_aside_and_keeps_its_own_checkpoints(
        tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 8, "train.keep_last=2"))
    old = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    assert sorted(old) == ["ckpt-00000006.pt", "ckpt-00000008.pt"]
    old_metrics = (out / "metrics.jsonl").read_text()

    proc = run_cli(*train_args(tiny_data, out, 4, "train.keep_last=2", "train.resume=never"))
    assert steps_in(out) == [2, 4]  # the new run's own checkpoints, both kept
    assert final_state(out)["progress"]["step"] == 4
    assert metrics_steps(out) == [1, 2, 3, 4]
    (archived,) = (out / "archive").iterdir()
    assert {p.name: p.read_bytes() for p in (archived / "checkpoints").iterdir()} == old
    assert (archived / "metrics.jsonl").read_text() == old_metrics
    assert (f"moved 2 checkpoint(s) and its metrics, config and grids of an earlier run to "
            f"{archived} (nothing is deleted)") in proc.stderr


def test_resuming_from_an_older_checkpoint_moves_the_newer_ones_aside(tiny_data: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 8, "train.keep_last=0"))
    newer = {n: (out / "checkpoints" / n).read_bytes()
             for n in ("ckpt-00000006.pt", "ckpt-00000008.pt")}
    branch = path_for(out / "checkpoints", 4)
    run_cli(*train_args(tiny_data, out, 8, "train.keep_last=0", f"train.resume={branch}",
                        "train.lr=2e-3"))
    (archived,) = (out / "archive").iterdir()
    assert {p.name: p.read_bytes() for p in (archived / "checkpoints").iterdir()} == newer
    assert steps_in(out) == [2, 4, 6, 8]
    assert path_for(out / "checkpoints", 8).read_bytes() != newer["ckpt-00000008.pt"]


def test_retention_never_deletes_the_checkpoint_it_just_wrote(tmp_path: Path) -> None:
    class Part:
        def state_dict(self) -> dict:
            return {"w": torch.ones(1)}

        def load_state_dict(self, state: dict) -> None: ...

    manager = checkpoint.CheckpointManager(tmp_path, {"part": Part()}, keep_last=1,
                                           milestone_every=0)
    path_for(tmp_path, 50).write_bytes(b"not ours")  # a newer step of some other writer
    for step in (1, 2, 3):
        manager.save(step, {"model": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000003.pt", "ckpt-00000050.pt"]


# ----------------------------------------------------------------------------- never from zero


def test_when_no_checkpoint_reads_the_run_refuses_and_touches_nothing(tiny_data: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 4))
    c2, c4 = path_for(out / "checkpoints", 2), path_for(out / "checkpoints", 4)
    os.truncate(c2, 1000)
    c4.unlink()
    c4.mkdir()  # cannot be read at all: every try fails with an OSError (EISDIR)
    before = snapshot(out)

    proc = run_cli(*train_args(tiny_data, out, 8), check=False)
    assert proc.returncode == 2
    line = last_line(proc)
    assert line.startswith(f"error: no checkpoint in {out / 'checkpoints'} can be read: ")
    assert f"{c4}: read error, 3 tries (Is a directory); check the file system; " in line
    assert f"{c2}: unreadable (truncated or corrupt): " in line
    assert line.endswith("Nothing was changed. Restore a good file, or start over with "
                         f"train.resume=never (the old files move to {out / 'archive'}/)")
    assert f"{c4}: read error (Is a directory), try 1 of 3; retrying in 1 s" in proc.stderr
    assert snapshot(out) == before  # no checkpoint, metric or config touched


def test_a_transient_read_error_is_retried_not_taken_for_corruption(tiny_data: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 4))
    c4 = path_for(out / "checkpoints", 4)
    saved = tmp_path / "saved.pt"
    os.replace(c4, saved)
    target = tmp_path / "server" / "ckpt.pt"
    target.parent.mkdir()
    c4.symlink_to(target)  # dangling: opening it fails (ENOENT), as a stale NFS handle does
    err = tmp_path / "stderr.txt"
    proc = start(train_args(tiny_data, out, 6), err)
    wait_for_text(err, f"{c4}: read error (No such file or directory), try 1 of 3; retrying", proc)
    os.replace(saved, target)  # the file system recovers
    assert proc.wait(timeout=300) == 0, err.read_text()[-3000:]
    text = err.read_text()
    assert f"resuming from {c4} (step 4)" in text and "skipping checkpoint" not in text
    assert steps_in(out) == [2, 4, 6]


def test_temp_files_of_a_killed_save_are_removed_at_start(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 2))
    stale = [out / ".metrics.jsonl.tmp-99999", out / "checkpoints" / ".ckpt-00000004.pt.tmp-99999",
             out / "samples" / ".step-00000004.png.tmp-99999"]
    (out / "samples").mkdir()
    for path in stale:
        path.write_bytes(b"half a file")
    proc = run_cli(*train_args(tiny_data, out, 4))
    assert not any(p.exists() for p in stale)
    assert ("removed 3 temp file(s) of an interrupted write: .metrics.jsonl.tmp-99999, "
            ".ckpt-00000004.pt.tmp-99999, .step-00000004.png.tmp-99999") in proc.stderr


# ----------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_and_the_first_goes_on(tiny_data: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = start(train_args(tiny_data, out, 10_000, "train.ckpt_every=1000"), tmp_path / "1.txt")
    try:
        wait_for_step(out / "metrics.jsonl", 2, first)
        second = run_cli(*train_args(tiny_data, out, 3), check=False)
        assert second.returncode == 2
        assert re.fullmatch(
            rf"error: {re.escape(str(out))} is in use by another training run \(host "
            rf"{re.escape(socket.gethostname())}, pid {first.pid}, since \S+\): wait for it to "
            rf"finish or stop it, or use another out_dir \(lock: "
            rf"{re.escape(str(out / 'train.lock'))}\)", last_line(second))
        now = metrics_steps(out)[-1]
        wait_for_step(out / "metrics.jsonl", now + 2, first)  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=300) == 75
    logged = metrics_steps(out)
    assert logged == list(range(1, len(logged) + 1))  # one writer: no step twice, none missing
    assert steps_in(out) == [logged[-1]]


def test_a_requeued_job_waits_for_its_predecessor_then_resumes_exactly(tiny_data: Path,
                                                                       tmp_path: Path) -> None:
    run_cli(*train_args(tiny_data, tmp_path / "straight", 12, "train.ckpt_every=1000"))
    out = tmp_path / "run"
    job = {"SLURM_JOB_ID": "4242"}
    first = start(train_args(tiny_data, out, 12, "train.ckpt_every=1000"), tmp_path / "1.txt",
                  **job)
    wait_for_step(out / "metrics.jsonl", 3, first)
    os.kill(first.pid, signal.SIGSTOP)  # a predecessor that is slow to let go
    try:
        impatient = run_cli(*train_args(tiny_data, out, 12, "train.lock_wait_s=1"), check=False,
                            env=job)
        assert impatient.returncode == 2
        assert "(waited 1 s for it): wait for it to finish or stop it" in last_line(impatient)

        err = tmp_path / "2.txt"
        second = start(train_args(tiny_data, out, 12, "train.ckpt_every=1000",
                                  "train.lock_wait_s=120"), err, **job)
        wait_for_text(err, f"waiting up to 120 s for the previous run of SLURM job 4242 to "
                           f"release {out / 'train.lock'}", second)
        first.send_signal(signal.SIGTERM)  # the requeue's stop signal, handled once it resumes
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 75
    assert second.wait(timeout=300) == 0, err.read_text()[-3000:]
    (stopped_at,) = re.findall(r"resuming from \S+ \(step (\d+)\)", err.read_text())
    assert 3 <= int(stopped_at) < 12
    assert_same_run(tmp_path / "straight", out)


# ----------------------------------------------------------------------------- run dir entries


@pytest.mark.parametrize("shape", ["broken link", "file"])
def test_a_checkpoints_folder_that_is_a_broken_link_or_a_file_is_refused(
        tiny_data: Path, tmp_path: Path, shape: str) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 2))
    (out / "checkpoints").rename(tmp_path / "scratch")  # a scratch disk that is not mounted
    if shape == "broken link":
        (out / "checkpoints").symlink_to(tmp_path / "unmounted")
        why = (f"is a link to {tmp_path / 'unmounted'}, which does not exist (a file system that "
               "is not mounted?): mount it, or remove the link to start without it")
    else:
        (out / "checkpoints").write_text("")
        why = "is not a folder, and the trainer needs one there: move it away"
    before = snapshot(out)
    proc = run_cli(*train_args(tiny_data, out, 4), check=False)
    assert (proc.returncode, last_line(proc)) == (
        2, f"error: {out / 'checkpoints'} {why}; nothing was changed")
    assert snapshot(out) == before  # metrics and config of the run kept, not restarted at 0


@pytest.mark.parametrize("name", ["train.lock", "config.yaml", "metrics.jsonl"])
def test_a_file_planted_as_a_link_in_the_run_directory_is_never_written_through(
        tiny_data: Path, tmp_path: Path, name: str) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's file\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(victim)
    proc = run_cli(*train_args(tiny_data, out, 2), check=False)
    assert (proc.returncode, last_line(proc)) == (
        2, f"error: {out / name} is a symbolic link (to {victim}), and the trainer never writes "
           "through one in a run directory: remove it; nothing was changed")
    assert victim.read_text() == "someone's file\n"
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_a_link_planted_where_a_grid_or_metrics_go_is_replaced_or_refused_not_followed(
        tiny_data: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's file\n")
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    grid = out / "samples" / "step-00000002.png"
    grid.symlink_to(victim)  # planted before the run writes its grid of step 2
    err = tmp_path / "err.txt"
    proc = start(train_args(tiny_data, out, 400, "train.sample_every=2", "sample.steps=2",
                            "sample.per_class=1"), err)
    try:
        wait_for_step(out / "metrics.jsonl", 3, proc)
        assert not grid.is_symlink() and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        (out / "metrics.jsonl").unlink()  # planted while the run goes on
        (out / "metrics.jsonl").symlink_to(victim)
        assert proc.wait(timeout=300) == 74
    finally:
        proc.kill()
    assert re.fullmatch(rf"error: could not write {re.escape(str(out / 'metrics.jsonl'))} \(it is "
                        r"a symbolic link, and nothing is written through one in a run directory; "
                        r"\d+\.\d MiB free there\); the newest checkpoint is intact: fix that and "
                        r"run the same command again", last_line_of(err))
    assert victim.read_text() == "someone's file\n"


def test_a_folder_link_is_followed_only_when_it_is_the_users_own(tiny_data: Path,
                                                                  tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a link to another user needs root")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(scratch)
    run_cli(*train_args(tiny_data, out, 2))  # our own link to another disk: used
    assert sorted(p.name for p in scratch.iterdir()) == ["ckpt-00000002.pt"]

    os.lchown(out / "checkpoints", 65534, 65534)  # now as if another user had planted it
    proc = run_cli(*train_args(tiny_data, out, 4), check=False)
    assert (proc.returncode, last_line(proc)) == (
        2, f"error: {out / 'checkpoints'} is a symbolic link (to {scratch}) owned by another user "
           "(uid 65534): only your own links to a folder are followed; remove it or point "
           "out_dir itself elsewhere; nothing was changed")
    assert sorted(p.name for p in scratch.iterdir()) == ["ckpt-00000002.pt"]


def test_a_read_only_part_of_the_run_directory_is_refused_before_anything_changes(
        tiny_data: Path, tmp_path: Path, read_only: Callable[[Path], None]) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 2, "train.sample_every=2", "sample.steps=2",
                        "sample.per_class=1"))
    read_only(out / "samples")
    before = snapshot(out)
    proc = run_cli(*train_args(tiny_data, out, 4, "train.sample_every=2", "sample.steps=2",
                               "sample.per_class=1"), check=False)
    assert (proc.returncode, last_line(proc)) == (
        2, f"error: {out / 'samples'} cannot be written (a read-only mount or its permissions): "
           "make it writable, or use another out_dir; nothing was changed")
    assert snapshot(out) == before


def test_a_run_whose_lock_file_is_removed_takes_it_again_and_one_whose_lock_was_taken_stops(
        tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    lock = out / "train.lock"
    err = tmp_path / "1.txt"
    first = start(train_args(tiny_data, out, 10_000, "train.ckpt_every=1000"), err)
    try:
        wait_for_step(out / "metrics.jsonl", 2, first)
        lock.unlink()  # e.g. a clean-up script
        wait_for_text(err, f"{lock} was removed while this run held it; taking it again", first)
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = run_cli(*train_args(tiny_data, out, 3), check=False)
        assert second.returncode == 2 and "is in use by another training run" in second.stderr

        os.kill(first.pid, signal.SIGSTOP)
        lock.unlink()
        run_cli(*train_args(tiny_data, out, 3, "train.resume=never"))  # another run came in
        taken = metrics_steps(out)
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 74
    finally:
        first.kill()
    assert re.fullmatch(rf"error: {re.escape(str(lock))} was replaced while this run held it: "
                        rf"another run \(host \S+, pid \d+, since \S+\) has written to "
                        rf"{re.escape(str(out))} since, so this run stopped without writing more "
                        r"there", last_line_of(err))
    assert metrics_steps(out) == taken == [1, 2, 3]  # the first run wrote nothing after
    assert steps_in(out) == [2, 3]  # the second run's only


# ----------------------------------------------------------------------------- changed settings


def test_changed_optimizer_settings_take_effect_on_resume(tiny_data: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 4))
    proc = run_cli(*train_args(tiny_data, out, 6, "train.lr=0.5", "train.adam_betas=[0.5,0.9]",
                               "train.weight_decay=0.25"))
    assert ("settings changed since that checkpoint, in effect from step 4: train.adam_betas "
            "[0.9, 0.999] -> [0.5, 0.9]; train.lr 0.001 -> 0.5; train.max_steps 4 -> 6; "
            "train.weight_decay 0.0 -> 0.25") in proc.stderr
    lrs = {json.loads(line)["step"]: json.loads(line)["lr"]
           for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert lrs == {1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 1e-3, 5: 0.5, 6: 0.5}
    group = final_state(out)["optimizer"]["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (0.5, (0.5, 0.9), 0.25)


def test_an_fp32_run_resumes_in_fp16(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 2))
    assert final_state(out)["grad_scaler"] == {}  # fp32 has no loss scale
    proc = run_cli(*train_args(tiny_data, out, 4, "train.precision=fp16"))
    assert "train.precision fp32 -> fp16" in proc.stderr
    state = final_state(out)
    assert state["step"] == 4 and state["grad_scaler"]["scale"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_world_size(tiny_data: Path, tmp_path: Path, before: int,
                                             after: int) -> None:
    dropout = "model.dropout=0.2"  # its masks too are per sample, not per rank
    launch(before, *train_args(tiny_data, tmp_path / "straight", 8, dropout))
    launch(before, *train_args(tiny_data, tmp_path / "run", 4, dropout))
    proc = launch(after, *train_args(tiny_data, tmp_path / "run", 8, dropout))
    assert (f"world size changed on resume: saved at {before}, resumed at {after}. The same "
            "global batches and noise continue") in proc.stderr
    b = final_state(tmp_path / "run")
    assert b["world_size"] == after and b["progress"]["images_seen"] == 8 * 16
    diff = max_weight_diff(tmp_path / "straight", tmp_path / "run")
    assert diff < ATOL, diff


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.ckpt_every=0"], "train.ckpt_every=0 must be >= 1"),
    (["train.log_every=0"], "train.log_every=0 must be >= 1"),
    (["train.grad_accum=0"], "train.grad_accum=0 must be >= 1"),
    (["train.batch_size=0"], "train.batch_size=0 must be >= 1"),
    (["model.image_size=30"], "model.image_size=30 must be a multiple of 4 (>= 8): the UNet "
                              "halves it 2 time(s), one per model.channel_mult level after the "
                              "first; e.g. 32"),
    (["train.sample_every=2", "sample.steps=0"],
     "sample.steps=0 must be in 1..1000 (diffusion.steps=1000)"),
    (["diffusion.steps=20"], "sample.steps=25 must be in 1..20 (diffusion.steps=20)"),
    (["out_dir=[x"], "override 'out_dir=[x' is not a valid value (expected ',' or ']', but got "
                     "'<stream end>' (line 1, column 3)); quote it if it is a string: "
                     "out_dir='[x'"),
    (["sample.guidance=nan"], "sample.guidance=nan must be a finite number"),
    (["model.attention_resolutions=[7]"], "model.attention_resolutions: 7 is not a resolution "
                                          "of this UNet (32, 16, 8); list some of those, or [] "
                                          "for attention in the middle block only"),
    (["model.name=seed_unet", "model.channels=8"],
     "model.channels has no effect with model.name=seed_unet (the code-along's fixed U-Net); "
     "remove it, or use model.name=unet"),
    (["model.num_classes=5"], "model.num_classes=5 but the data has 10; remove "
                              "model.num_classes (it comes from the data)"),
    (["seed=1180591620717411303424"], "config key 'seed' must fit in 64 bits (at most "
                                      "9223372036854775807); got 1180591620717411303424"),
    (["data.debian_dir=~"], "config key 'data.debian_dir' needs a value; YAML reads an empty "
                            "value, ~ and null as nothing (quote it to mean the text)"),
    (["tracking.project=Null"], "config key 'tracking.project' needs a value; YAML reads an "
                                "empty value, ~ and null as nothing (quote it to mean the text)"),
    (["train.resume=/nonexistent/ckpt.pt"], "train.resume=/nonexistent/ckpt.pt: no such "
                                            "checkpoint file (use auto, never, or the path of a "
                                            "ckpt-*.pt file)"),
])
def test_bad_settings_fail_with_one_line_before_any_work(tiny_data: Path, tmp_path: Path,
                                                         overrides: list[str],
                                                         message: str) -> None:
    out = tmp_path / "run"
    proc = run_cli("train", f"data.root={tiny_data}", f"out_dir={out}", *overrides, check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {message}\n"
    assert not out.exists()  # nothing was started


def test_a_batch_larger_than_the_data_is_refused_before_an_earlier_run_is_moved(
        tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 2))
    before = snapshot(out)
    proc = run_cli(*train_args(tiny_data, out, 2, "train.resume=never", "train.batch_size=320"),
                   check=False)
    assert (proc.returncode, proc.stderr.splitlines()[-1]) == (
        2, "error: train.batch_size=320 exceeds the 160 images")
    assert snapshot(out) == before and not (out / "archive").exists()


def test_an_image_size_whose_activations_cannot_fit_is_refused_before_the_run_dir(
        tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli(*train_args(tiny_data, out, 2, "model.image_size=4096", "train.batch_size=8"),
                   check=False)
    assert proc.returncode == 2
    need, free = map(float, re.fullmatch(
        r"error: model.image_size=4096: a micro-batch of 8 image\(s\) keeps at least ([\d.]+) GiB "
        r"of activations for the backward on each rank, more than the ([\d.]+) GiB free on cpu "
        r"\(rank 0\); lower train.batch_size or raise train.grad_accum, or use a smaller "
        r"model.image_size", last_line(proc)).groups())
    assert need > 1000 > free  # terabytes of activations; this machine has gigabytes
    assert not out.exists()
    run_cli(*train_args(tiny_data, out, 1, "model.image_size=64", "train.batch_size=8"))


def test_an_out_dir_that_cannot_be_created_fails_with_one_line(tiny_data: Path,
                                                                tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    proc = run_cli(*train_args(tiny_data, out, 2), check=False)
    assert (proc.returncode, proc.stderr) == (2, f"error: out_dir {out} cannot be used: Not a "
                                                 "directory\n")


@pytest.mark.parametrize(("content", "message"), [
    (b"train:\n  lr: [1e-3\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' "
                               "(line 3, column 1)"),
    (b"train:\n  lr: 1e-3\n  batch_size: 8\n  lr: 2e-3\n",
     "is not valid YAML: key 'lr' is given twice (which one was meant?) (line 4, column 3)"),
    (b"train:\n  lr: 1e-3 # \xe9t\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 20); save it "
                                          "as UTF-8"),
])
def test_a_broken_config_file_fails_with_one_line(tmp_path: Path, content: bytes,
                                                  message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    proc = run_cli("train", "--config", str(path), f"out_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: config file {path} {message}\n"


def test_a_torn_last_metrics_line_is_dropped_on_resume(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 4))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # the run died while writing this record
    proc = run_cli(*train_args(tiny_data, out, 6))
    assert "dropping its torn last line" in proc.stderr
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6]


def test_a_bad_metrics_line_is_refused_before_newer_checkpoints_are_moved_aside(
        tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 4))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = "not a record"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(out)
    proc = run_cli(*train_args(tiny_data, out, 4,
                               f"train.resume={path_for(out / 'checkpoints', 2)}"), check=False)
    assert (proc.returncode, last_line(proc)) == (
        2, f"error: {out / 'metrics.jsonl'} line 2 is not a JSON record ('not a record'); fix or "
           "delete that line")
    assert snapshot(out) == before and not (out / "archive").exists()  # checkpoint 4 stays


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "run"
    run_cli(*train_args(tiny_data, out, 2))
    return out


@pytest.mark.parametrize(("flags", "message"), [
    (["--steps", "-1"], "--steps=-1 must be >= 1"),
    (["--steps", "5000"], "--steps=5000 must be in 1..100 (diffusion.steps=100)"),
    (["--per-class", "-1"], "--per-class=-1 must be >= 1"),
    (["--classes", ","], "--classes ',' names no class; use all, or names or indices such as "
                         "t-shirt,pants or 0,1"),
    (["--classes", "²"], "unknown class '²'; use one of: all, t-shirt, pants, sweater, dress, "
                         "coat, sandal, shirt, sneaker, purse, boot (or 0..9)"),
    (["--guidance", "nan"], "--guidance=nan must be a finite number"),
    (["--eta", "-0.5"], "--eta=-0.5 must be >= 0"),
])
def test_bad_sample_flags_fail_with_one_line(trained: Path, tmp_path: Path, flags: list[str],
                                             message: str) -> None:
    out = tmp_path / "grid.png"
    proc = run_cli("sample", "--run", str(trained), *flags, "--out", str(out), check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {message}\n"
    assert not out.exists()


def test_sample_and_fid_name_what_is_wrong_with_the_run_or_the_output(trained: Path,
                                                                      tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    cases = [
        (["sample", "--run", str(trained), "--out", str(tmp_path / "grid")],
         f"--out {tmp_path / 'grid'}: name an image file, e.g. grid.png (PNG, JPEG, WebP, ...)"),
        (["sample", "--run", str(empty), "--out", "x.png"],
         f"no checkpoints in {empty / 'checkpoints'}; train first (ddp-diffusion train "
         f"out_dir={empty})"),
        (["sample", "--run", str(tmp_path / "missing"), "--out", "x.png"],
         f"run directory {tmp_path / 'missing'} does not exist; pass the out_dir of a run"),
        (["fid", "--run", str(trained), "--steps", "-1"], "--steps=-1 must be >= 1"),
        (["fid", "--run", str(trained), "--steps", "5000"],
         "--steps=5000 must be in 1..100 (diffusion.steps=100)"),
        (["fid", "--run", str(trained), "--guidance", "nan"],
         "--guidance=nan must be a finite number"),
        (["fid", "--run", str(trained), "--num-samples", "1"], "--num-samples=1 must be >= 2"),
        (["fid", "--run", str(empty)], f"no checkpoints in {empty / 'checkpoints'}; train first "
                                       f"(ddp-diffusion train out_dir={empty})"),
    ]
    for args, message in cases:
        proc = run_cli(*args, check=False)
        assert (proc.returncode, proc.stderr) == (2, f"error: {message}\n"), args


def test_sample_takes_the_new_newest_checkpoint_when_the_newest_is_pruned_as_it_reads(
        trained: Path, tmp_path: Path) -> None:
    """A training run saves step 4 and prunes step 3 just as `sample` opens step 3, the newest
    file it listed: the deletion happens for real at that open (an audit hook on this process's
    file opens), and load_run lists again instead of retrying the deleted path."""
    from ddp_diffusion.runs import load_run

    ckpts = tmp_path / "run" / "checkpoints"
    state = checkpoint.read(path_for(trained / "checkpoints", 2))
    for step in (2, 3):
        checkpoint.write_atomic({**state, "step": step}, path_for(ckpts, step))
    doomed, saved = path_for(ckpts, 3), path_for(ckpts, 4)
    armed = [True]

    def prune_on_open(event: str, args: tuple) -> None:
        if event == "open" and armed and os.fspath(args[0]) == str(doomed):
            armed.clear()  # once; the hook stays installed in this process but does nothing
            checkpoint.write_atomic({**state, "step": 4}, saved)
            doomed.unlink()

    sys.addaudithook(prune_on_open)
    try:
        start_s = time.monotonic()
        run = load_run(tmp_path / "run", None, None, torch.device("cpu"))
    finally:
        armed.clear()
    assert run.step == 4 and not doomed.exists()
    assert time.monotonic() - start_s < 2.0  # no read retries (1 s + 2 s of back-off)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder bind-mounted read-only (root writes through permission bits, not through this)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    for cmd in (["mount", "--bind", str(folder), str(folder)],
                ["mount", "-o", "remount,ro,bind", str(folder)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            subprocess.run(["umount", str(folder)], capture_output=True)
            pytest.skip(f"cannot bind-mount read-only here: {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


TINY_FID = ["--num-samples", "4", "--batch-size", "4", "--sampler", "ddim", "--steps", "2"]


def test_an_output_that_cannot_be_written_is_refused_before_any_sampling(
        trained: Path, tmp_path: Path, read_only_dir: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    for out, reason in [(read_only_dir / "grid.png", "Read-only file system"),
                        (tmp_path / "file" / "grid.png", "Not a directory"),
                        (tmp_path, "Is a directory")]:
        for cmd in (["sample", "--run", str(trained), "--out"],
                    ["fid", "--run", str(trained), *TINY_FID, "--out"]):
            target = out if cmd[0] == "sample" or out == tmp_path else out.with_suffix(".json")
            if cmd[0] == "sample" and out == tmp_path:
                target = tmp_path / "grid.png"
                target.mkdir()
            proc = run_cli(*cmd, str(target), check=False)
            # The only line: no log of sampling (or of anything else) came before it.
            assert (proc.returncode, proc.stderr) == (
                2, f"error: --out {target} cannot be written ({reason}); choose another path\n"
            ), cmd
            assert proc.stdout == ""
    assert os.listdir(read_only_dir) == []


def test_a_grid_too_large_for_its_image_file_is_refused_before_any_sampling(
        trained: Path, tmp_path: Path) -> None:
    # 100000 a class is 3.4 million pixels wide (26 GB of noise before), more than Pillow opens:
    # 84 + 34 n + 2 pixels wide, 342 high, fits 178956970 pixels up to n = 15387.
    for out, per_class, message in [
        (tmp_path / "grid.png", 100000,
         "--per-class 100000: a grid of 10 classes x 100000 images is 3400086x342 pixels, more "
         "than PNG allows (2147483647 a side) or Pillow opens (178956970 pixels); use "
         "--per-class 15387 or fewer"),
        (tmp_path / "grid.webp", 500,
         "--per-class 500: a grid of 10 classes x 500 images is 17086x342 pixels, more than "
         "WEBP allows (16383 a side) or Pillow opens (178956970 pixels); use --per-class 479 "
         "or fewer"),
    ]:
        start_s = time.monotonic()
        proc = run_cli("sample", "--run", str(trained), "--per-class", str(per_class), "--out",
                       str(out), check=False)
        assert (proc.returncode, proc.stderr) == (2, f"error: {message}\n")
        assert not out.exists() and time.monotonic() - start_s < 60


def test_a_disk_that_fills_before_the_grid_is_written_fails_with_one_line(
        trained: Path, small_disk: Path) -> None:
    filler = small_disk / "filler"
    with filler.open("wb") as f:  # fill every block: an empty file still fits (an inode)
        try:
            while True:
                f.write(b"\0" * 2**16)
                f.flush()
        except OSError:
            pass
    out = small_disk / "grid.png"
    proc = run_cli("sample", "--run", str(trained), "--out", str(out), check=False)
    assert proc.returncode == 74
    assert re.fullmatch(rf"error: could not write {re.escape(str(out))} \(No space left on "
                        r"device; 0\.0 MiB free there\)", last_line(proc))
    assert "sampling 20 images" in proc.stderr  # the work was done; only its write failed
    assert sorted(os.listdir(small_disk)) == ["filler"]  # no partial grid or temp file


# ----------------------------------------------------------------------------- stops and faults


def test_a_stop_signal_during_the_sample_grid_stops_at_that_step(tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    err = tmp_path / "stderr.txt"
    # A grid of 10 images x 60 guided DDIM steps takes seconds on one core.
    proc = start(train_args(tiny_data, out, 12, "train.ckpt_every=1000", "train.sample_every=4",
                            "sample.per_class=1", "sample.steps=60"), err)
    wait_for_step(out / "metrics.jsonl", 4, proc)  # logged just before the grid of step 4
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 75, err.read_text()[-3000:]
    assert steps_in(out) == [4]  # saved at the step whose grid it was drawing, not one later
    assert (out / "samples" / "step-00000004.png").is_file()
    assert "stopped by SIGTERM at step 4 after saving a checkpoint" in err.read_text()


def test_weights_of_a_non_finite_streak_are_never_saved_over_good_checkpoints(
        tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*train_args(tiny_data, out, 4, "train.keep_last=1"))
    good = path_for(out / "checkpoints", 4)
    saved = good.read_bytes()
    # Step 5's loss and gradients are finite; its update (lr 1e12) blows the weights up, and
    # every step after it is non-finite: the checkpoints due at steps 6 and 8 must not replace
    # (and, with keep_last=1, delete) the good one.
    proc = run_cli(*train_args(tiny_data, out, 20, "train.keep_last=1", "train.lr=1e12",
                               "train.grad_clip=0"), check=False)
    assert proc.returncode == 3
    assert f"step 6: no checkpoint in a streak of non-finite steps; the newest stays {good}" in (
        proc.stderr)
    assert last_line(proc) == (
        f"error: loss was non-finite for 5 steps in a row (up to step 10); last checkpoint: "
        f"{good}; lower train.lr, set train.grad_clip, or use train.precision=fp32")
    assert steps_in(out) == [4] and good.read_bytes() == saved
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" not in r] == [6, 7, 8, 9]  # no fake 0.0
    assert records[-1]["nonfinite_total"] == 4


@pytest.mark.slow
def test_a_bad_resume_path_or_a_wandb_that_cannot_start_stops_every_rank(tiny_data: Path,
                                                                        tmp_path: Path) -> None:
    env = {k: v for k, v in cli_env().items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc: W&B online has no API key
    for extra, message in [
        ("train.resume=/nonexistent/ckpt.pt",
         "train.resume=/nonexistent/ckpt.pt: no such checkpoint file (use auto, never, or the "
         "path of a ckpt-*.pt file)"),
        ("tracking.wandb=online",
         "W&B could not start (UsageError: No API key configured. Use `wandb login` to log "
         "in.): run `wandb login` or set WANDB_API_KEY, or use tracking.wandb=offline (sync "
         "later) or tracking.wandb=disabled"),
    ]:
        start_s = time.monotonic()
        proc = subprocess.run(torchrun_cmd(2, *train_args(tiny_data, tmp_path / "run", 4, extra)),
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert proc.stderr.count(f"error: {message}\n") == 2, proc.stderr[-3000:]  # each rank
        # ... and exits 2, not killed by torchrun's SIGTERM while the interpreter shuts down.
        assert proc.stderr.count("exitcode  : 2 ") == 2, proc.stderr[-3000:]
        assert time.monotonic() - start_s < 120  # nobody waited for a collective's timeout
        assert steps_in(tmp_path / "run") == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "--lazy", str(mnt)], check=True)


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_resumes_when_freed(
        tiny_data: Path, tmp_path: Path, small_disk: Path) -> None:
    run_cli(*train_args(tiny_data, tmp_path / "straight", 4))
    out = small_disk / "run"
    run_cli(*train_args(tiny_data, out, 2))
    c2 = path_for(out / "checkpoints", 2)
    saved = c2.read_bytes()
    st = os.statvfs(small_disk)  # fill the disk but 1 MiB: metrics fit, a checkpoint does not
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 2**20))

    proc = run_cli(*train_args(tiny_data, out, 4), check=False)
    assert proc.returncode == 74
    c4 = re.escape(str(path_for(out / "checkpoints", 4)))
    assert re.fullmatch(rf"error: could not write {c4} \(No space left on device; \d+\.\d MiB free "
                        r"there\)", last_line(proc))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [c2.name]  # no temp file
    assert c2.read_bytes() == saved

    filler.unlink()
    proc = run_cli(*train_args(tiny_data, out, 4))  # the same command, once there is space
    assert f"resuming from {c2} (step 2)" in proc.stderr
    assert_same_run(tmp_path / "straight", out)
