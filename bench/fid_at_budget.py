"""FID at a fixed wall-clock training budget: the code-along's loop against our CPU recipe.

    python bench/fid_at_budget.py train --data-root /tmp/data --budget-min 20 --runs runs/budget
    python bench/fid_at_budget.py eval --runs runs/budget --data-root /tmp/data   # 10k, DDIM 50
    python bench/fid_at_budget.py pack --runs runs/budget --to /tmp/carry  # EMA-only fp16 copies

`train` runs (a) bench/codealong.py and (b) our recipe (configs/quickstart_cpu.yaml under
torchrun, 2 ranks x 1 thread) for the same wall-clock budget, one after the other on an otherwise
idle machine. Our cosine schedule has to know its length, so a short calibration run (outside the
budget) measures our step time and sets train.max_steps to what fits; train.time_limit_minutes
stops it at the budget regardless. `eval` computes FID with the fashion features and the class
accuracy for both runs with the same protocol, and writes OUT/fid_at_budget.{md,json}. `pack`
makes small copies of the two runs (weights only, fp16) to evaluate them on another machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from train_throughput import TIMING, step_seconds, trainer_command  # bench/, beside this file

from ddp_diffusion import checkpoint, config, distributed, rundir
from ddp_diffusion.fid import evaluate
from ddp_diffusion.precision import resolve_precision
from ddp_diffusion.runs import load_run

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "quickstart_cpu.yaml"
RANKS = 2  # 2 ranks x 1 thread beat 1 x 2 on 2 cores (docs/performance.md)
RUNS = ("codealong", "ours")


def ours_command(data_root: str, out: Path, overrides: list[str]) -> list[str]:
    """Our recipe under torchrun, with the given extra overrides."""
    return trainer_command(RECIPE, [f"out_dir={out}", f"data.root={data_root}",
                                    "tracking.wandb=disabled", "train.sample_every=0",
                                    *overrides], RANKS)


def calibrate(data_root: str, work: Path, steps: int = 12) -> float:
    """Median seconds per step of our recipe after 2 warm-up steps, from a short run."""
    out = work / "calibration"
    subprocess.run(ours_command(data_root, out, [*TIMING, f"train.max_steps={steps}"]),
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return statistics.median(step_seconds(out, config.load(RECIPE).train.batch_size, warmup=2))


def train(args: argparse.Namespace) -> None:
    """Both runs for the same budget; each writes a run directory under --runs."""
    runs, budget_s = Path(args.runs), 60 * args.budget_min
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, str(REPO / "bench" / "codealong.py"), "--data-root",
                    args.data_root, "--time-budget", str(budget_s), "--save",
                    str(runs / "codealong"), "--json", str(runs / "codealong.json")],
                   check=True, cwd=REPO, env=env)
    step_s = calibrate(args.data_root, runs)
    max_steps = int(budget_s / step_s)
    print(f"ours: {step_s:.2f} s/step measured, so train.max_steps={max_steps}", flush=True)
    subprocess.run(ours_command(args.data_root, runs / "ours", [
        f"train.max_steps={max_steps}", f"train.time_limit_minutes={args.budget_min}",
        "train.resume=never", f"train.ckpt_every={10**9}", "train.log_every=20"]),
        check=True, cwd=REPO, env=env)
    (runs / "budget.json").write_text(json.dumps({
        "budget_min": args.budget_min, "ours_step_s": step_s, "ours_max_steps": max_steps,
        "recipe": str(RECIPE.relative_to(REPO)), "ranks": RANKS}))


def pack(args: argparse.Namespace) -> None:
    """EMA weights (fp16), config and step of each run's newest checkpoint, for carrying."""
    for name in RUNS:
        found, _ = checkpoint.newest_readable(Path(args.runs) / name / rundir.CHECKPOINTS)
        if found is None:
            raise SystemExit(f"no checkpoint in {Path(args.runs) / name}; run train first")
        path, state = found
        part = checkpoint.Part
        weights = {k: v.half() if v.is_floating_point() else v for k, v in state[part.EMA].items()}
        small = {"step": state["step"], "images_seen": state[part.PROGRESS]["images_seen"],
                 "config": state["config"], part.MODEL: weights, part.EMA: weights,
                 "note": f"EMA weights of {path} in fp16 (bench/fid_at_budget.py pack)"}
        to = checkpoint.path_for(Path(args.to) / name / rundir.CHECKPOINTS, state["step"])
        checkpoint.write_atomic(small, to)
    for extra in ("budget.json", "codealong.json"):
        if (Path(args.runs) / extra).is_file():
            (Path(args.to) / extra).write_bytes((Path(args.runs) / extra).read_bytes())


def evaluate_runs(args: argparse.Namespace) -> None:
    """FID (fashion features) and class accuracy of both runs; a table in OUT."""
    env = distributed.init()
    try:
        rows: list[dict[str, Any]] = []
        precision = resolve_precision(args.precision, env.device)
        for name in RUNS:
            cfg, denoiser, diffusion, step, _ = load_run(Path(args.runs) / name, None, True,
                                                      env.device)
            cfg.data.root = args.data_root
            fc = dataclasses.replace(cfg.fid, num_samples=args.num_samples, sampler="ddim",
                                     steps=args.steps, guidance=args.guidance,
                                     features="fashion", reference="train",
                                     batch_size=args.batch_size)
            row = evaluate(denoiser, diffusion, cfg, fc, args.seed, precision)
            row.update(run=name, model=cfg.model.name, train_steps=step,
                       train_images=step * cfg.train.batch_size)
            rows.append(row)
            if env.is_main:
                print(f"{name}: FID {row['fid']:.2f}, class accuracy "
                      f"{row['class_accuracy']:.3f} after {step} steps", flush=True)
        if env.is_main:
            budget = json.loads((Path(args.runs) / "budget.json").read_text())
            device = (torch.cuda.get_device_name(env.device) if env.device.type == "cuda"
                      else "CPU")
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "fid_at_budget.json").write_text(json.dumps(
                {"budget": budget, "rows": rows, "eval_device": device}, indent=1))
            table = report(rows, budget, device)
            (out / "fid_at_budget.md").write_text(table)
            print(table)
    finally:
        distributed.shutdown()


def report(rows: list[dict[str, Any]], budget: dict[str, Any], device: str) -> str:
    """A markdown table of the two runs and the FID ratio."""
    r = rows[0]
    lines = [
        f"Training budget {budget['budget_min']:g} min of wall clock each, on the same CPU. "
        f"FID: fashion features, {r['num_samples']} samples, DDIM {r['steps']} steps, guidance "
        f"{r['guidance']:g}, reference = {r['reference_samples']} train images, seed {r['seed']}; "
        f"sampled on {device} ({r['precision']}).",
        "",
        "| run | model | training steps | training images | FID | class accuracy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['run']} | {row['model']} | {row['train_steps']} | "
                     f"{row['train_images']} | {row['fid']:.2f} | {row['class_accuracy']:.3f} |")
    lines += ["", f"FID ratio code-along / ours: **{rows[0]['fid'] / rows[1]['fid']:.1f}x**."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data-root", default="data")
    t.add_argument("--budget-min", type=float, default=20.0)
    t.add_argument("--runs", default="runs/fid_at_budget")
    k = sub.add_parser("pack")
    k.add_argument("--runs", default="runs/fid_at_budget")
    k.add_argument("--to", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--runs", default="runs/fid_at_budget")
    e.add_argument("--data-root", default="data")
    e.add_argument("--num-samples", type=int, default=10000)
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--guidance", type=float, default=2.0)
    e.add_argument("--precision", default="auto")
    e.add_argument("--batch-size", type=int, default=250, help="images per generation chunk")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=str(REPO / "docs"))
    args = p.parse_args(argv)
    {"train": train, "pack": pack, "eval": evaluate_runs}[args.command](args)


if __name__ == "__main__":
    main()
