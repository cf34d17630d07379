"""`train --dry-run`: every check train makes before it changes anything, then what it would do,
and not a byte written; its resume answer is what train then does."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from conftest import TINY, run_cli, run_torchrun

from ddp_diffusion import config
from ddp_diffusion.diffusion import build_denoiser
from ddp_diffusion.model import count_parameters


def tree(*roots: Path) -> dict[str, tuple[str, int]]:
    """Every file under the roots: its content digest and modification time."""
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()}


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *TINY, f"data.root={data}", f"out_dir={out}", "train.ckpt_every=2",
            "train.keep_last=0", *extra]


def report(proc_stdout: str) -> dict[str, str]:
    """The dry run's lines by their first word."""
    return {line.split()[0].rstrip(":"): line for line in proc_stdout.splitlines() if line}


def test_a_fresh_start_is_described_and_nothing_is_created(tiny_data: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = tree(tiny_data)
    proc = run_cli(*args(tiny_data, out, "train.lr=2e-3"), "--dry-run")
    assert not out.exists() and tree(tiny_data) == before
    lines = report(proc.stdout)
    assert lines["out_dir"] == f"out_dir {out}: start a new run at step 0; move nothing aside"
    assert lines["world"] == ("world size 1 (cpu, fp32): global batch 16 = 1 rank(s) x 1 "
                              "micro-step(s) x 16 image(s) per micro-batch")
    cfg = config.with_data_shape(config.load(None, TINY).model, num_classes=10, channels=1)
    params = count_parameters(build_denoiser(cfg, 100)) / 1e6
    assert lines["model"].startswith(f"model unet: {params:.2f}M parameters, ")
    assert lines["data"].startswith("data: fashion_mnist, 160 images, 10 class(es), 1 channel")
    assert "  train.lr = 0.002 (default 0.0001)" in proc.stdout.splitlines()
    assert lines["W&B"] == "W&B: disabled"


def test_its_resume_answer_is_what_train_then_does_and_it_touches_nothing(
        tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*args(tiny_data, out, "train.max_steps=6"))
    newest = out / "checkpoints" / "ckpt-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn: the resume falls back to step 4
    before = tree(out, tiny_data)
    proc = run_cli(*args(tiny_data, out, "train.max_steps=8"), "--dry-run")
    assert tree(out, tiny_data) == before  # not a byte, not a timestamp
    ckpt4 = out / "checkpoints" / "ckpt-00000004.pt"
    assert report(proc.stdout)["out_dir"] == (
        f"out_dir {out}: resume from {ckpt4} (step 4); move 1 checkpoint(s) and 0 post-hoc "
        f"snapshot(s) to {out / 'archive'}/")

    trained = run_cli(*args(tiny_data, out, "train.max_steps=8"))
    assert f"resuming from {ckpt4} (step 4)" in trained.stderr
    (archive,) = (out / "archive").iterdir()
    assert [p.name for p in (archive / "checkpoints").iterdir()] == ["ckpt-00000006.pt"]


def test_a_new_run_over_an_old_one_says_what_moves_and_a_frozen_change_is_refused(
        tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*args(tiny_data, out, "train.max_steps=4"))
    before = tree(out)
    proc = run_cli(*args(tiny_data, out, "train.resume=never"), "--dry-run")
    assert report(proc.stdout)["out_dir"] == (
        f"out_dir {out}: start a new run at step 0; move 2 checkpoint(s) and the earlier run's "
        f"metrics, config, grids and post-hoc snapshots to {out / 'archive'}/")
    refused = run_cli(*args(tiny_data, out, "model.channels=24"), "--dry-run", check=False)
    assert refused.returncode == 2 and refused.stdout == ""
    assert re.match(r"error: cannot resume from .*ckpt-00000004\.pt: model\.channels: 16 -> 24 "
                    r"changed", refused.stderr.strip().splitlines()[-1])
    assert tree(out) == before


def test_under_torchrun_every_rank_checks_and_one_reports(tiny_data: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_torchrun(2, *args(tiny_data, out, "train.grad_accum=2"), "--dry-run")
    assert proc.stdout.count("dry run:") == 1
    assert report(proc.stdout)["world"] == (
        "world size 2 (cpu, fp32): global batch 16 = 2 rank(s) x 2 micro-step(s) x 4 image(s) "
        "per micro-batch")
    assert not out.exists()
    bad = run_torchrun(2, *args(tiny_data, out, "train.batch_size=15"), "--dry-run",
                       check=False)
    assert bad.returncode != 0 and "train.batch_size=15" in bad.stderr
