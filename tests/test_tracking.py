"""W&B offline: the logged history reads back equal to metrics.jsonl; resume keeps the run id."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TINY, final_state, run_cli


def wandb_history(run_dir: Path) -> list[dict]:
    """History records of an offline run, read from its .wandb log by `wandb leet inspect`."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb_cli), "leet", "inspect", str(run_dir), "--json"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def test_wandb_offline_history_matches_metrics_and_resume_keeps_id(tiny_data: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["train", *TINY, f"data.root={tiny_data}", f"out_dir={out}", "tracking.wandb=offline",
            "train.log_every=2", "train.ckpt_every=4"]
    run_cli(*base, "train.max_steps=4")
    run_id = final_state(out)["progress"]["run_id"]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(f"-{run_id}")

    run_cli(*base, "train.max_steps=8")  # resumes from step 4
    assert final_state(out)["progress"]["run_id"] == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert all(r.name.endswith(f"-{run_id}") for r in runs)  # same W&B run continued

    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [2, 4, 6, 8]
    logged = {}
    for run in runs:
        for item in wandb_history(run):
            logged[item["_step"]] = item
    assert sorted(logged) == [2, 4, 6, 8]
    for record in jsonl:
        item = logged[record["step"]]
        assert item["loss"] == record["loss"] and item["lr"] == record["lr"]
        assert item["grad_norm"] == record["grad_norm"]
