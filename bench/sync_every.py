"""What a host sync per step costs: training images/s at several `train.sync_every`, A B C A B C.

    python bench/sync_every.py --data-root /tmp/data                  # this device's default
    python bench/sync_every.py --data-root /tmp/data --values 1,10 --steps 40 --out /tmp/s

At a sync point the host waits for the device to finish the step (to read the non-finite flags)
and the ranks agree on stop signals over a CPU collective. Between sync points the host only
queues work. The cost shows where steps are short: a small model on a GPU, whose kernels the
host would otherwise queue ahead. Every run logs once per `--log-every` steps (also a sync point,
so it must be a multiple of every value) and the images/s of each interval after the first is
one sample. Writes OUT/sync_every_<device>.json and .md after every run (the rows so far),
so a run cut short by a time limit keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from train_throughput import (  # bench/, beside this file
    QUICKSTART,
    RECOMMENDED,
    TIMING,
    machine,
    run_process,
    trainer_command,
)

from ddp_diffusion import rundir


def run(cfg_path: Path, overrides: list[str], ranks: int, steps: int, log_every: int,
        out: Path, data_root: str) -> list[float]:
    """Images/s of each logged interval after the first (its steps include start-up)."""
    cmd = trainer_command(cfg_path, [*overrides, *TIMING, f"train.log_every={log_every}",
                                     f"train.max_steps={steps}", f"out_dir={out}",
                                     f"data.root={data_root}"], ranks)
    code, _, tail = run_process(cmd, dict(os.environ, PYTHONUNBUFFERED="1"))
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}:\n{tail}")
    records = [json.loads(line) for line in (out / rundir.METRICS).read_text().splitlines()]
    return [r["images_per_s"] for r in records[1:]]


def rows(values: list[int], samples: dict[int, list[float]]) -> list[dict[str, Any]]:
    """Median and spread of images/s of each value measured so far (the others left out)."""
    return [{"sync_every": v, "images_per_s": statistics.median(samples[v]),
             "min": min(samples[v]), "max": max(samples[v]), "samples": samples[v]}
            for v in values if samples[v]]


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table plus the machine line."""
    m, done, planned = result["machine"], result["runs_done"], result["runs_planned"]
    partial = f" **Partial: {done} of {planned} runs finished.**" if done < planned else ""
    lines = [f"Measured {m['date']} on {m.get('gpu', m['cpu'])} ({m['cores']} CPU cores, "
             f"flags {m['cpu_flags'] or 'none of avx2/avx512_bf16/amx_bf16'}, torch "
             f"{m['torch']}): `{' '.join([result['config'], *result['overrides']])}`, "
             f"{result['ranks']} rank(s), {result['rounds']} rounds of {result['steps']} steps "
             f"(logged every {result['log_every']}), alternating.{partial}", "",
             "| train.sync_every | images/s (median) | min–max | vs sync every step |",
             "|---:|---:|---:|---:|"]
    base = result["rows"][0]["images_per_s"]
    for r in result["rows"]:
        lines.append(f"| {r['sync_every']} | {r['images_per_s']:.1f} | {r['min']:.1f}–"
                     f"{r['max']:.1f} | {r['images_per_s'] / base:.3f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="data")
    p.add_argument("--config", type=Path, default=RECOMMENDED if cuda else QUICKSTART)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run (e.g. train.batch_size=32)")
    p.add_argument("--ranks", type=int, default=1 if cuda else 2)
    p.add_argument("--values", default="1,2,5,10,50", help="train.sync_every values")
    p.add_argument("--steps", type=int, default=400 if cuda else 100)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    args = p.parse_args(argv)
    values = [int(v) for v in args.values.split(",")]
    if any(v < 1 or args.log_every % v for v in values):
        p.error(f"--values must be >= 1 and divide --log-every={args.log_every}")
    if args.steps < 2 * args.log_every:
        p.error("--steps must cover at least two logged intervals (2 x --log-every)")

    device = "cuda" if cuda else "cpu"
    about = {"machine": machine(torch.device(device)), "config": str(args.config.name),
             "overrides": args.set, "ranks": args.ranks, "steps": args.steps,
             "log_every": args.log_every, "rounds": args.rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sync_every_{device}"
    samples: dict[int, list[float]] = {v: [] for v in values}
    result: dict[str, Any] = {}
    # Both files are rewritten after every run: a run stopped by a time limit keeps the rest.
    runs = 0
    with tempfile.TemporaryDirectory(prefix="sync-every-") as tmp:
        for r in range(args.rounds):
            for v in values:
                rates = run(args.config, [*args.set, f"train.sync_every={v}"], args.ranks,
                            args.steps, args.log_every, Path(tmp) / f"{r}-{v}", args.data_root)
                samples[v] += rates
                runs += 1
                print(f"round {r + 1}/{args.rounds} sync_every={v}: "
                      f"{statistics.median(rates):.1f} images/s", flush=True)
                result = {**about, "runs_done": runs, "runs_planned": args.rounds * len(values),
                          "rows": rows(values, samples)}
                stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
                stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
