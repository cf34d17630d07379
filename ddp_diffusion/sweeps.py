"""Sweeps: the grid of `submit --sweep KEY=V1,V2 ...`, each point's run directory and W&B run
named from its overrides, the record of the points (SWEEP_FILE in the sweep's folder) and what
`sweep-status` reads back from each point's metrics.jsonl. Torch-free."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddp_diffusion import files, rundir
from ddp_diffusion.errors import UserError

SWEEP_FILE = "sweep.yaml"


@dataclass(frozen=True)
class Point:
    """One point of the grid: its overrides and the name of its run directory and W&B run."""

    overrides: tuple[str, ...]  # "key=value", in the order of the --sweep flags

    @property
    def name(self) -> str:
        """The overrides as a folder name: 'train.lr=2e-4,model.channels=64'."""
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(self.overrides))


def grid(sweep: list[tuple[str, list[str]]]) -> list[Point]:
    """Every combination of the values, the first --sweep varying slowest."""
    return [Point(tuple(f"{k}={v}" for (k, _), v in zip(sweep, values, strict=True)))
            for values in itertools.product(*(vs for _, vs in sweep))]


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """SWEEP_FILE: the config, the base overrides, the points and the job array."""
    files.write_text_atomic(folder / SWEEP_FILE, yaml.safe_dump(record, sort_keys=False))


def read_record(folder: Path) -> dict[str, Any]:
    """A sweep's record, or a one-line UserError."""
    path = folder / SWEEP_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist: pass the folder that submit --sweep made (its "
                        "out_dir)")
    record = yaml.safe_load(path.read_text())
    if not isinstance(record, dict) or not isinstance(record.get("points"), list):
        raise UserError(f"{path} is not a sweep record (no list of points)")
    return record


def check_same_points(folder: Path, points: list[Point]) -> None:
    """A folder holds one sweep: submitting other points into it is refused (the same points
    again resume each where it is)."""
    if not (folder / SWEEP_FILE).is_file():
        return
    known = [p["name"] for p in read_record(folder)["points"]]
    if known != [p.name for p in points]:
        raise UserError(f"{folder / SWEEP_FILE} records another sweep ({len(known)} points: "
                        f"{', '.join(known[:3])}{', ...' if len(known) > 3 else ''}); use a new "
                        "out_dir, or the same --sweep flags to continue it")


def point_status(out_dir: Path) -> dict[str, Any]:
    """A point's last logged step and loss and its last FID (None: not logged yet)."""
    status: dict[str, Any] = {"step": None, "loss": None, "fid": None}
    path = out_dir / rundir.METRICS
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in record:
            status["step"], status["loss"] = record["step"], record["loss"]
        if "fid" in record:
            status["fid"] = record["fid"]
    return status


def status_table(folder: Path) -> str:
    """One line per point: its name, step of max_steps, last loss and last FID."""
    record = read_record(folder)
    rows = [("point", "step", "loss", "fid")]
    for p in record["points"]:
        s = point_status(folder / p["name"])
        rows.append((p["name"], f"{s['step'] if s['step'] is not None else '-'}/"
                                f"{p['max_steps']}",
                     "-" if s["loss"] is None else f"{s['loss']:.4f}",
                     "-" if s["fid"] is None else f"{s['fid']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    job = record.get("job_array")
    return "\n".join([f"sweep {folder}: {len(record['points'])} point(s)"
                      + (f", SLURM job array {job}" if job else ""), *lines]) + "\n"
