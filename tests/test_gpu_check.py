"""bench/gpu_check.py, the one prepared GPU check: its smoke mode on a CPU runs every section and
writes what it measured as each finishes; a section cut off by its cap is recorded, not fatal."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from conftest import REPO, cli_env

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # bench/ holds scripts, not a package

SECTIONS = ["host_syncs", "resume", "throughput", "fid"]


def run_check(data: Path, out: Path, *extra: str) -> dict:
    """Run the check in smoke mode; its summary.json."""
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--data-root",
                           str(data), "--out", str(out), *extra], capture_output=True, text=True,
                          cwd=REPO, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def is_count(x: object) -> bool:
    """A finite, non-negative number (not a bool, not None)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def test_the_caps_and_start_up_fit_the_eight_minutes() -> None:
    assert sum(gpu_check.CAPS.values()) + gpu_check.STARTUP_S <= 480
    assert list(gpu_check.CAPS) == list(gpu_check.SMOKE_CAPS) == SECTIONS


def test_smoke_run_measures_every_section(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_check(tiny_data, out)
    sections = summary["sections"]
    assert list(sections) == SECTIONS and summary["device"] == "cpu" and summary["smoke"]
    for name, s in sections.items():
        assert s["status"] == "ok", (name, s.get("line"), s.get("error"))
        assert s["seconds"] <= s["cap_s"] + 5 and s["line"]
        for r in s["runs"]:  # every subprocess has its own raw log, beginning with its command
            if r["status"] != "skipped":
                assert (out / r["log"]).read_text().startswith("$ "), r

    # Host reads: both loaders, two lengths each; none in the steady-state step.
    hs = sections["host_syncs"]["result"]
    assert [(r["loader"], r["precision"]) for r in hs["rows"]] == [("memory", "fp32"),
                                                                     ("stream", "fp32")]
    for r in hs["rows"]:
        assert set(r["counts"]) == {"4", "8"} and is_count(r["host_reads_per_step"])
        assert r["cuda_syncs_per_step"] is None  # a CPU has no CUDA syncs to count
    assert hs["host_reads_per_step_max"] == max(r["host_reads_per_step"] for r in hs["rows"])
    assert hs["host_reads_per_step_max"] == 0 and hs["sync_free"] is True

    # Resume: stopped at 3, resumed to 6, compared with the straight run part by part.
    rs = sections["resume"]["result"]
    (row,) = rs["rows"]
    assert row["deterministic"] is True and row["resumed"] and row["steps"] == [6, 6]
    assert row["bitwise_equal"] and row["max_abs_diff"] == {"model": 0.0, "ema": 0.0,
                                                            "optimizer": 0.0}
    assert rs["deterministic_bitwise_equal"] is True

    tp = sections["throughput"]["result"]
    for r in (tp["seed_unet"], tp["largest_batch"], tp["recommended_eager"]):
        assert r["status"] == "ok" and r["images_per_s"] > 0 and r["tflops"] > 0, r
    assert tp["seed_unet"]["batch_size"] == 2 and tp["largest_batch"]["batch_size"] == 4
    assert tp["recommended_compile"]["status"] == "skipped"

    fid = sections["fid"]["result"]
    assert fid["step"] == 5 and fid["num_samples"] == 20 and fid["features"] == "fashion"
    assert fid["reference_samples"] == 160  # the --data-root given: tiny_data's train split
    assert math.isfinite(fid["fid"]) and fid["fid"] > 0 and 0 <= fid["class_accuracy"] <= 1

    page = (out / "summary.md").read_text()
    assert all(f"| {name} | ok |" in page for name in SECTIONS)


def test_a_section_cut_off_by_its_cap_is_recorded_and_the_next_still_reported(
        tiny_data: Path, tmp_path: Path) -> None:
    # --total 24 leaves 4 s after the 20 s start-up allowance: the host-read runs are killed,
    # the FID section finds its cap spent before it starts.
    out = tmp_path / "out"
    summary = run_check(tiny_data, out, "--sections", "host_syncs,fid", "--total", "24")
    hs, fid = summary["sections"]["host_syncs"], summary["sections"]["fid"]
    assert hs["status"] == "timeout" and hs["seconds"] < 15
    assert any("killed after" in r.get("reason", "") for r in hs["runs"])
    assert hs["result"]["rows"] == [] and hs["result"]["host_reads_per_step_max"] is None
    assert fid["status"] == "timeout"
    assert fid["runs"][0]["reason"] == "not started: the section's cap was spent"
    assert "| fid | timeout |" in (out / "summary.md").read_text()


def test_max_difference_is_zero_only_for_identical_parts() -> None:
    a = {"w": torch.ones(3), "state": [{"step": torch.tensor(2.0)}, 1]}
    assert gpu_check.max_difference(a, {"w": torch.ones(3),
                                        "state": [{"step": torch.tensor(2.0)}, 1]}) == 0.0
    b = {"w": torch.tensor([1.0, 1.5, 1.0]), "state": [{"step": torch.tensor(2.0)}, 1]}
    assert gpu_check.max_difference(a, b) == 0.5
    assert gpu_check.max_difference(a, {**a, "w": torch.ones(3, dtype=torch.float64)}) == math.inf
    assert gpu_check.max_difference(a, {"w": a["w"]}) == math.inf
