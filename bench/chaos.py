"""Chaos run: kill a 2-rank training with the stream loader at random moments, SIGKILL and
SIGTERM mixed, and check that it still ends bitwise equal to a run that never stopped.

The run goes under `torchrun --max-restarts` (a rank that dies makes torchrun restart them all,
and they resume from the newest checkpoint) on a small image folder read by the stream loader
with 2 workers a rank. Each kill is one of:

  rank-kill  SIGKILL to one rank (the kernel's OOM killer, a segfault)
  rank-term  SIGTERM to one rank (it saves, exits 75, and torchrun restarts the ranks)
  job-term   SIGTERM to every process of the job: agent, ranks, loader workers (what SLURM does on
             scancel, preemption and the time limit); then the job is launched again (a requeue)
  job-kill   SIGKILL to every process (a node lost); launched again

at a moment that is either random (during training steps) or aimed: while a checkpoint is being
written (its temp file exists) or while the sample grid is drawn. Where each kill landed is read
from the run directory at that instant. At the end: the final checkpoint equals the straight
run's in every trained part, no temp file is left, every checkpoint reads, and metrics.jsonl
holds each step once.

    python bench/chaos.py                  # 12 kills; writes docs/chaos.json and docs/chaos.md
    python bench/chaos.py --kills 4 --out-dir /tmp/x
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from ddp_diffusion import checkpoint, errors, files, rundir  # noqa: E402  (bench/ holds scripts)

KINDS = ("rank-kill", "rank-term", "job-term", "job-kill")
AIMS = ("step", "save", "grid")
STEPS, CKPT_EVERY, GRID_EVERY = 60, 2, 10
RUN = ["model.channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
       "model.attention_resolutions=[]", "diffusion.steps=100", "train.batch_size=8",
       "train.lr=1e-3", "train.precision=fp32", "train.num_threads=1", "tracking.wandb=disabled",
       "data.dataset=image_folder", "data.loader=stream", "data.num_workers=2",
       "data.hflip=true", f"train.max_steps={STEPS}", "train.log_every=1",
       f"train.ckpt_every={CKPT_EVERY}", f"train.sample_every={GRID_EVERY}",
       "sample.sampler=ddim", "sample.steps=20", "sample.per_class=2"]


def make_folder(root: Path) -> Path:
    """Two classes of 12 random-blob PNGs (RGB)."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(12):
            pixels = np.kron(rng.integers(0, 256, (9, 10, 3), dtype=np.uint8),
                             np.ones((4, 4, 1), dtype=np.uint8))
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def torchrun(args: list[str], max_restarts: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={max_restarts}", "-m", "ddp_diffusion", "train", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "WANDB_MODE": "offline"}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (as a job's cgroup holds them)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [d for c in map(int, out.split()) for d in (c, *descendants(c))]


def ranks(agent: int) -> list[int]:
    """The training processes torchrun started (its direct children)."""
    out = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def logged_steps(out: Path) -> list[int]:
    path = out / rundir.METRICS
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line being written
            steps.append(json.loads(line)["step"])
    return steps


def newest_checkpoint(out: Path) -> int:
    found = checkpoint.list_checkpoints(out / rundir.CHECKPOINTS)
    return found[-1][0] if found else 0


def temp_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob(f".*{files.TEMP_MARK}*"))


def where_now(out: Path) -> str:
    """Where the run stands at this instant: writing a checkpoint, drawing a grid, or stepping."""
    if any((out / rundir.CHECKPOINTS).glob(f".ckpt-*{files.TEMP_MARK}*")):
        return "save"
    steps = logged_steps(out)
    last = steps[-1] if steps else 0
    if (last and last % GRID_EVERY == 0 and newest_checkpoint(out) == last
            and not (out / rundir.SAMPLES / f"step-{last:08d}.png").exists()):
        return "grid"
    return "step" if steps else "start-up"


def wait_for(cond: Callable[[], bool], agent: subprocess.Popen, timeout: float,
             poll: float) -> bool:
    """Poll `cond` until true (True), the agent exits or the time is up (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and agent.poll() is None:
        if cond():
            return True
        time.sleep(poll)
    return False


def aim(out: Path, target: str, agent: subprocess.Popen, rng: random.Random) -> None:
    """Wait for the moment a kill is aimed at (best effort: a missed aim kills where it is)."""
    if target == "save":
        wait_for(lambda: any((out / rundir.CHECKPOINTS).glob(f".ckpt-*{files.TEMP_MARK}*")), agent,
                 60, 0.0005)
    elif target == "grid":
        wait_for(lambda: where_now(out) == "grid", agent, 60, 0.005)
    else:
        time.sleep(rng.uniform(0.0, 1.5))


def kill(kind: str, agent: subprocess.Popen, rng: random.Random) -> bool:
    """Send the kill; whether it reached a process."""
    sig = signal.SIGKILL if kind.endswith("kill") else signal.SIGTERM
    targets = ([rng.choice(ranks(agent.pid))] if kind.startswith("rank") and ranks(agent.pid)
               else [agent.pid, *descendants(agent.pid)] if kind.startswith("job") else [])
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, sig)
    return bool(targets)


def chaos(args: list[str], out: Path, kills: int, seed: int, log: Path) -> dict:
    """Run training to the end under `kills` kills; what happened."""
    rng = random.Random(seed)
    plan = [(KINDS[i % len(KINDS)], AIMS[i % len(AIMS)]) for i in range(kills)]
    rng.shuffle(plan)
    record, launches, exits = [], 0, []
    agent = None
    with log.open("w") as err:
        while True:
            if agent is None or agent.poll() is not None:
                if agent is not None:
                    exits.append(agent.returncode)
                    if agent.returncode == 0:
                        break
                agent = subprocess.Popen(torchrun(args, max_restarts=4 * kills), cwd=REPO,
                                         env=env(), stdout=err, stderr=err)
                launches += 1
            if not plan:
                agent.wait()
                continue
            # Progress between kills: a checkpoint newer than at the last kill.
            base = newest_checkpoint(out)
            if not wait_for(lambda b=base: newest_checkpoint(out) > b, agent, 600, 0.05):
                continue
            kind, target = plan[0]
            aim(out, target, agent, rng)
            if agent.poll() is not None:
                continue  # finished before this kill: relaunching shows the run is done
            landed = where_now(out)
            steps = logged_steps(out)
            if kill(kind, agent, rng):
                plan.pop(0)
                record.append({"kind": kind, "aimed": target, "landed": landed,
                               "last_logged_step": steps[-1] if steps else 0})
                print(f"kill {len(record)}: {kind:9s} aimed at {target:4s}, landed in "
                      f"{landed:8s} (step {record[-1]['last_logged_step']})", flush=True)
    return {"kills": record, "launches": launches, "launch_exit_codes": exits}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--out-dir", default=str(REPO / "docs"), help="where chaos.json/.md go")
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="chaos-"))
    folder = make_folder(work / "folder")
    common = [*RUN, f"data.path={folder}", f"data.root={work / 'data'}"]
    t0 = time.monotonic()
    subprocess.run(torchrun([*common, f"out_dir={work / 'straight'}"], 0), cwd=REPO, env=env(),
                   check=True, capture_output=True)
    straight_s = time.monotonic() - t0
    out = work / "chaos"
    t0 = time.monotonic()
    result = chaos([*common, f"out_dir={out}"], out, a.kills, a.seed, work / "chaos.log")
    unreadable = []
    for _, path in checkpoint.list_checkpoints(out / rundir.CHECKPOINTS):
        try:
            checkpoint.read(path, tries=1)
        except errors.CheckpointError as e:
            unreadable.append(str(e))
    final = checkpoint.list_checkpoints(out / rundir.CHECKPOINTS)[-1][1]
    differences = checkpoint.training_differences(
        checkpoint.read(checkpoint.list_checkpoints(work / "straight" / rundir.CHECKPOINTS)[-1][1]),
        checkpoint.read(final))
    result |= {
        "machine": {"cpu_flags": sorted(set(re.findall(r"\b(avx512_bf16|avx2|amx_bf16)\b",
                                                       Path("/proc/cpuinfo").read_text()))),
                    "cores": os.cpu_count(), "python": platform.python_version()},
        "steps": STEPS, "straight_s": round(straight_s, 1),
        "chaos_s": round(time.monotonic() - t0, 1),
        "counts": {f"{k} / {w}": n for (k, w), n in sorted(Counter(
            (r["kind"], r["landed"]) for r in result["kills"]).items())},
        "final_step": int(checkpoint.read(final)["step"]),
        "bitwise_equal_to_straight": not differences, "differences": differences[:10],
        "temp_files_left": [str(t) for t in temp_files(out)],
        "unreadable_checkpoints": unreadable,
        "metrics_steps_once_each": logged_steps(out) == list(range(1, STEPS + 1)),
        "archived": sorted(str(p.relative_to(out)) for p in (out / rundir.ARCHIVE).rglob("*.pt")),
        "work": str(work),
    }
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {n} |" for k, n in result["counts"].items())
    ok = (result["bitwise_equal_to_straight"] and not result["temp_files_left"]
          and not unreadable and result["metrics_steps_once_each"])
    (out_dir / "chaos.md").write_text(
        f"# Chaos run\n\n`python bench/chaos.py --kills {a.kills} --seed {a.seed}` on "
        f"{result['machine']['cores']} cores, CPU flags {' '.join(result['machine']['cpu_flags'])}"
        f": a 2-rank stream-loader run of {STEPS} steps (checkpoint every {CKPT_EVERY}, grid "
        f"every {GRID_EVERY}) under torchrun --max-restarts, killed {len(result['kills'])} times."
        f"\n\n| kill / where it landed | count |\n|---|---|\n{rows}\n\n"
        f"- launches of torchrun (the first and one per job-level kill): {result['launches']}\n"
        f"- final step {result['final_step']}; bitwise equal to the uninterrupted run: "
        f"{result['bitwise_equal_to_straight']}\n"
        f"- temp files left: {len(result['temp_files_left'])}; unreadable checkpoints: "
        f"{len(unreadable)}; every step logged once: {result['metrics_steps_once_each']}\n"
        f"- wall time: straight {result['straight_s']} s, chaos {result['chaos_s']} s\n")
    print(json.dumps({k: result[k] for k in ("counts", "launches", "bitwise_equal_to_straight",
                                              "temp_files_left", "unreadable_checkpoints",
                                              "metrics_steps_once_each")}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
