"""One prepared GPU check in at most 8 minutes: host syncs, bitwise resume, throughput and FID.

    python bench/gpu_check.py --data-root data                  # docs/gpu/check-<UTC date>/
    python bench/gpu_check.py --data-root /tmp/tiny --smoke --out /tmp/c   # a CPU smoke run

Four sections, most important first, each with its own cap (every subprocess gets a timeout that
ends within its section's cap); the caps and a start-up allowance add up to --total (480 s):

  host_syncs  The steady-state step's host reads: bench/host_reads.py around two runs that differ
              only in train.max_steps (20 and 60), every sync point but the final step beyond
              both, for data.loader memory/stream x precision bf16/fp16. (count(60) - count(20))
              / 40 per kind must be 0: the dispatch-mode reads and, on CUDA, the synchronizing
              calls that torch.cuda.set_sync_debug_mode("warn") reports.
  resume      A straight run of N steps against one stopped at N/2 and resumed to N, with
              train.deterministic=true (model, EMA and optimizer compared bit for bit) and
              =false (the largest difference, reported).
  throughput  images/s and fraction of the bf16 peak (from the trainer's metrics.jsonl): the
              code-along's U-Net at batch 192 and at the largest power of two that fits, the
              recommended UNet eager and compiled.
  fid         FID (fashion features, 2000 samples) of a short quickstart run.

Every subprocess writes its stdout and stderr to OUT/<section>/<run>.log; OUT/summary.json and
summary.md are rewritten when a section starts and when it ends. A failed section is recorded
and the next one runs. --smoke is the same on a CPU at toy size (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from train_throughput import (  # bench/, beside this file
    GPU_VARIANTS,
    QUICKSTART,
    RECOMMENDED,
    REPO,
    SEED,
    TIMING,
    machine,
    trainer_command,
)

from ddp_diffusion import checkpoint, config, errors, rundir
from ddp_diffusion.classifier import WEIGHTS as FASHION_CLASSIFIER

# The clock starts after the imports; STARTUP_S is the allowance for the interpreter, the
# imports and the set-up, so that the caps below plus STARTUP_S add up to the 480 s total.
T0 = time.monotonic()
STARTUP_S = 20
# Seconds per section, most important first.
CAPS = {"host_syncs": 80, "resume": 80, "throughput": 220, "fid": 80}
# Smoke runs take about a quarter of these on 2 idle cores: room for a busy machine.
SMOKE_CAPS = {"host_syncs": 120, "resume": 90, "throughput": 120, "fid": 90}
# A model small enough that a CPU step takes milliseconds (tests/conftest.py's TINY).
SMOKE = ["model.channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
         "model.attention_resolutions=[]", "diffusion.steps=100", "train.batch_size=16",
         "train.precision=fp32", "train.num_threads=1"]
NEVER = 10**6  # a cadence beyond every run here: the final step is its only occurrence
QUIET = ["train.sample_every=0", "fid.every=0", "tracking.wandb=disabled"]
# Host-read kinds of bench/host_reads.py; `cuda_syncs` (CUDA only) is reported on its own.
READ_KINDS = ("item", "tolist", "numpy", "cpu")
# How running out of GPU memory ends a run: PyTorch's allocator, cuBLAS, cuDNN.
OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_not_enough_workspace")

LIVE: set[subprocess.Popen] = set()  # running subprocesses, killed if this script is stopped
LIVE_LOCK = threading.Lock()
STOPPING = threading.Event()  # set by a stop signal: start nothing more


@dataclass
class Check:
    """What every section needs: where things go, the device, the mode and the clock."""

    out: Path
    work: Path
    data_root: Path
    cuda: bool
    smoke: bool
    jobs: int
    deadline: float  # monotonic time by which the current section must end
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> list[str]:
        """Overrides that shrink the quickstart/recommended models in smoke mode."""
        return SMOKE if self.smoke else []

    def left(self) -> float:
        """Seconds left in the current section's cap."""
        return self.deadline - time.monotonic()

    def env(self) -> dict[str, str]:
        """The subprocesses' environment: unbuffered output, no W&B."""
        return dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")

    def threads(self) -> int:
        """CPU threads per run when `jobs` runs share the machine's cores."""
        return max(1, len(os.sched_getaffinity(0)) // self.jobs)

    def write_summary(self) -> None:
        """summary.json and summary.md, as they stand now."""
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1))
        (self.out / "summary.md").write_text(markdown(self.summary))


def run_logged(check: Check, cmd: list[str], log: Path, cap: float | None = None
               ) -> dict[str, Any]:
    """Run `cmd` with its output in `log`, killed with its children when the cap runs out."""
    timeout = check.left() if cap is None else min(cap, check.left())
    log.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"log": str(log.relative_to(check.out)), "cmd": shlex.join(cmd)}
    if timeout < 2 or STOPPING.is_set():
        return {**record, "status": "timeout", "seconds": 0.0,
                "reason": "not started: " + ("stopped" if STOPPING.is_set()
                                             else "the section's cap was spent")}
    t0 = time.monotonic()
    with log.open("w") as f:
        f.write(f"$ {record['cmd']}\n")
        f.flush()
        # A session of its own, so that a timeout also ends its DataLoader and compile workers.
        proc = subprocess.Popen(cmd, cwd=REPO, env=check.env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        with LIVE_LOCK:
            LIVE.add(proc)
        if STOPPING.is_set():  # the stop signal came as it started
            kill(proc)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
            code = None
        finally:
            with LIVE_LOCK:
                LIVE.discard(proc)
    record.update(seconds=round(time.monotonic() - t0, 1), returncode=code,
                  status="ok" if code == 0 else "timeout" if code is None else "failed")
    if code is None:
        record["reason"] = f"killed after {timeout:.0f} s (the cap)"
    elif code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        if any(m in tail.lower() for m in OOM_MESSAGES):
            record.update(status="oom", reason="out of memory")
        else:
            record["reason"] = tail.strip().splitlines()[-1] if tail.strip() else ""
    return record


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a subprocess's whole session (its workers too) and reap it."""
    with contextlib.suppress(ProcessLookupError):  # it may have just exited
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_chains(check: Check, chains: list[list[tuple[list[str], Path]]]) -> list[list[dict]]:
    """Run chains of commands `check.jobs` at a time; a chain stops at its first failure."""
    def chain(cmds: list[tuple[list[str], Path]]) -> list[dict[str, Any]]:
        done: list[dict[str, Any]] = []
        for cmd, log in cmds:
            done.append(run_logged(check, cmd, log))
            if done[-1]["status"] != "ok":
                break
        return done

    with ThreadPoolExecutor(max_workers=check.jobs) as pool:
        return list(pool.map(chain, chains))


def status_of(runs: list[dict[str, Any]], expected: tuple[str, ...] = ("ok",)) -> str:
    """A section's status from its runs: timeout if one was cut off, failed if one failed."""
    if any(r["status"] == "timeout" for r in runs):
        return "timeout"
    return "ok" if all(r["status"] in expected for r in runs) else "failed"


def train_args(*overrides: str) -> list[str]:
    """`train --config quickstart OVERRIDES` as arguments of the ddp-diffusion CLI."""
    return ["train", "--config", str(QUICKSTART), *overrides]


# ------------------------------------------------------------------------------------ sections


def host_syncs(check: Check) -> dict[str, Any]:
    """Steady-state host reads (and CUDA syncs) per step, by loader and precision."""
    short, long = (4, 8) if check.smoke else (20, 60)
    precisions = ("fp32",) if check.smoke else ("bf16", "fp16")
    loaders = {"memory": ["data.loader=memory"],
               "stream": ["data.loader=stream", "data.num_workers=2"]}
    # Every cadence beyond both lengths: the final step is the only sync point of either run,
    # so the difference of the two counts is what 40 steady-state steps read.
    base = [*check.model, *QUIET, f"train.sync_every={NEVER}", f"train.log_every={NEVER}",
            f"train.ckpt_every={NEVER}", "train.resume=never",
            f"train.num_threads={check.threads()}", f"data.root={check.data_root}"]
    combos = [(loader, p) for loader in loaders for p in precisions]
    chains, counts_at = [], {}
    for loader, precision in combos:
        for steps in (short, long):
            name = f"{loader}-{precision}-{steps}"
            counts_at[loader, precision, steps] = check.work / "host_syncs" / f"{name}.json"
            cmd = [sys.executable, str(REPO / "bench" / "host_reads.py"),
                   str(counts_at[loader, precision, steps]),
                   *train_args(*base, *loaders[loader], f"train.precision={precision}",
                               f"train.max_steps={steps}",
                               f"out_dir={check.work / 'host_syncs' / name}")]
            chains.append([(cmd, check.out / "host_syncs" / f"{name}.log")])
    runs = [r for c in run_chains(check, chains) for r in c]
    rows = []
    for loader, precision in combos:
        files = [counts_at[loader, precision, s].with_name(
            f"{counts_at[loader, precision, s].stem}.rank0.json") for s in (short, long)]
        if not all(f.is_file() for f in files):
            continue
        a, b = (json.loads(f.read_text()) for f in files)
        per_step = {k: (b.get(k, 0) - a.get(k, 0)) / (long - short) for k in sorted({*a, *b})}
        rows.append({"loader": loader, "precision": precision,
                     "counts": {str(short): a, str(long): b}, "per_step": per_step,
                     "host_reads_per_step": sum(per_step.get(k, 0.0) for k in READ_KINDS),
                     "cuda_syncs_per_step": (per_step.get("cuda_syncs", 0.0) if check.cuda
                                             else None)})
    reads = [r["host_reads_per_step"] for r in rows]
    syncs = [r["cuda_syncs_per_step"] for r in rows if r["cuda_syncs_per_step"] is not None]
    result = {"lengths": [short, long], "rows": rows,
              "host_reads_per_step_max": max(reads) if reads else None,
              "cuda_syncs_per_step_max": max(syncs) if syncs else None,
              "sync_free": bool(rows) and not any(reads) and not any(syncs)}
    line = ", ".join(f"{r['loader']} {r['precision']} {r['host_reads_per_step']:g}"
                     + (f" ({r['cuda_syncs_per_step']:g} CUDA syncs)" if check.cuda else "")
                     for r in rows)
    return {"status": status_of(runs), "runs": runs, "result": result,
            "line": f"steady-state host reads per step: {line or 'none measured'}"}


def max_difference(a: Any, b: Any) -> float:
    """The largest absolute difference of two checkpoint parts (inf where they differ in kind)."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return math.inf
        return 0.0 if torch.equal(a, b) else (a.double() - b.double()).abs().max().item()
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return math.inf
        return max((max_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return math.inf
        return max((max_difference(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return 0.0 if a == b else math.inf


def newest_state(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint of a run, read the trainer's way."""
    return checkpoint.read(checkpoint.list_checkpoints(run_dir / rundir.CHECKPOINTS)[-1][1])


def resume(check: Check) -> dict[str, Any]:
    """A straight run against a stopped-and-resumed one: model/EMA/optimizer bit for bit."""
    n = 6 if check.smoke else 100
    modes = (True,) if check.smoke else (True, False)
    # Constant LR after the warm-up: the half run's max_steps must not change the schedule.
    # Dropout draws from the RNG, so its state must be restored too.
    base = [*check.model, *QUIET, "train.lr_schedule=constant", "model.dropout=0.1",
            f"train.log_every={max(1, n // 4)}", f"train.ckpt_every={NEVER}",
            f"train.num_threads={check.threads()}", f"data.root={check.data_root}"]
    chains, pairs = [], []
    for det in modes:
        tag = f"deterministic_{str(det).lower()}"
        straight, resumed = (check.work / "resume" / f"{tag}-{k}" for k in ("straight", "resumed"))
        flag = f"train.deterministic={str(det).lower()}"

        def cmd(out: Path, steps: int, flag: str = flag) -> list[str]:
            return trainer_command(QUICKSTART, [*base, flag, f"train.max_steps={steps}",
                                                f"out_dir={out}"], 1)

        logs = check.out / "resume"
        chains.append([(cmd(straight, n), logs / f"{tag}-straight.log")])
        chains.append([(cmd(resumed, n // 2), logs / f"{tag}-half.log"),
                       (cmd(resumed, n), logs / f"{tag}-resume.log")])
        pairs.append((det, straight, resumed))
    runs = [r for c in run_chains(check, chains) for r in c]
    rows = []
    for det, straight, resumed in pairs:
        try:
            a, b = newest_state(straight), newest_state(resumed)
        except (IndexError, errors.CheckpointError) as e:  # a run did not finish
            rows.append({"deterministic": det, "error": f"{type(e).__name__}: {e}"})
            continue
        part = checkpoint.Part
        diffs = {k: max_difference(a[k], b[k]) for k in (part.MODEL, part.EMA, part.OPTIMIZER)}
        steps = [a[part.PROGRESS]["step"], b[part.PROGRESS]["step"]]
        # A resume that silently started afresh would match the straight run trivially.
        log = check.out / "resume" / f"deterministic_{str(det).lower()}-resume.log"
        did_resume = log.is_file() and f"(step {n // 2})" in log.read_text(errors="replace")
        rows.append({"deterministic": det, "steps": steps, "resumed": did_resume,
                     "bitwise_equal": did_resume and steps == [n, n] and not any(diffs.values()),
                     "max_abs_diff": {k: v if math.isfinite(v) else "structure differs"
                                      for k, v in diffs.items()}})
    done = [r for r in rows if "bitwise_equal" in r]
    line = "; ".join(f"deterministic={str(r['deterministic']).lower()}: "
                     + ("bitwise equal" if r["bitwise_equal"] else "did NOT resume"
                        if not r["resumed"] else f"DIFFERENT, max abs diff {r['max_abs_diff']}")
                     for r in done)
    result = {"steps": n, "stopped_at": n // 2, "rows": rows,
              "deterministic_bitwise_equal": next((r["bitwise_equal"] for r in done
                                                   if r["deterministic"]), None)}
    return {"status": status_of(runs), "runs": runs, "result": result,
            "line": line or "no comparison: a run did not finish"}


def timed_run(check: Check, name: str, cfg: Path, overrides: list[str], log_every: int,
              intervals: int, cap: float) -> dict[str, Any]:
    """One trainer run of `intervals` + 1 logged intervals; the medians after the first."""
    out = check.work / "throughput" / name
    batch = config.load(cfg, overrides).train.batch_size
    cmd = trainer_command(cfg, [*overrides, *TIMING, f"train.log_every={log_every}",
                                f"train.max_steps={log_every * (intervals + 1)}",
                                f"out_dir={out}", f"data.root={check.data_root}"], 1)
    record = {"name": name, "batch_size": batch,
              **run_logged(check, cmd, check.out / "throughput" / f"{name}.log", cap)}
    metrics = out / rundir.METRICS
    if record["status"] == "ok" and not metrics.is_file():
        record.update(status="failed", reason=f"no {metrics.name}")
    if record["status"] == "ok":
        # The first interval holds start-up (and compilation): left out.
        rows = [json.loads(x) for x in metrics.read_text().splitlines()][1:]
        for key in ("images_per_s", "tflops", "peak_fraction"):
            values = [r[key] for r in rows if key in r]
            record[key] = statistics.median(values) if values else None
    return record


def throughput(check: Check) -> dict[str, Any]:
    """images/s and fraction of peak: code-along U-Net at 192 and at the largest batch that
    fits, recommended UNet eager and compiled."""
    seed = (["train.precision=fp32", "train.num_threads=1", "train.batch_size=2"] if check.smoke
            else list(GPU_VARIANTS["ours bf16 channels_last"][1]))
    rec = ([*SMOKE, "train.compile=false", "model.dropout=0"] if check.smoke
           else list(GPU_VARIANTS["recommended UNet bf16"][1]))
    log_every, intervals = (1, 2) if check.smoke else (20, 3)
    runs = [timed_run(check, "seed_unet-b2" if check.smoke else "seed_unet-b192", SEED, seed,
                      log_every, intervals, 60),
            timed_run(check, "recommended-eager", RECOMMENDED, rec, log_every, intervals, 60)]
    if check.smoke:  # compiling on a small CPU takes minutes: not a smoke test's business
        runs.append({"name": "recommended-compile", "status": "skipped",
                     "reason": "smoke mode: torch.compile is left out on the CPU"})
    else:
        runs.append(timed_run(check, "recommended-compile", RECOMMENDED,
                              [*rec, "train.compile=true"], log_every, intervals, 110))
    # The largest power-of-two batch that fits: up from 1024 until one runs out of memory (or
    # down while even 1024 does not fit), each a short run. It comes last because it is open-
    # ended: it takes what the fixed runs above left of the cap. The top stays below an epoch.
    batch, floor, top = (4, 4, 4) if check.smoke else (1024, 256, 32768)
    grow, largest = True, None
    search: list[dict[str, Any]] = []
    while floor <= batch <= top and check.left() > 5:
        r = timed_run(check, f"seed_unet-b{batch}", SEED, [*seed, f"train.batch_size={batch}"],
                      1 if check.smoke else 3, 2, 45)
        search.append(r)
        if r["status"] == "ok":
            largest = r
            if not grow:
                break  # backing off: the first that fits
        elif r["status"] == "oom" and largest is None:
            grow = False  # not even the first fits: halve
        else:
            break  # the first that does not fit, or a failure or cut-off (the log says why)
        batch = batch * 2 if grow else batch // 2
    runs += search
    named = {r["name"]: r for r in runs}

    def rate(r: dict[str, Any] | None) -> str:
        """'N images/s (P% of peak)', or why there is no number."""
        if r is None or r.get("images_per_s") is None:
            return r["status"] if r else "not measured"
        frac = r.get("peak_fraction")
        return (f"{r['images_per_s']:.0f} images/s" + (f" ({frac:.0%} of peak)" if frac else ""))

    first = runs[0]
    line = (f"seed_unet b{first['batch_size']} {rate(first)}; largest batch "
            f"{largest['batch_size'] if largest else '-'} {rate(largest)}; recommended eager "
            f"{rate(named['recommended-eager'])}, compiled {rate(named['recommended-compile'])}")
    result = {"seed_unet": first, "largest_batch": largest, "batch_search": search,
              "recommended_eager": named["recommended-eager"],
              "recommended_compile": named["recommended-compile"]}
    # Once one batch fits, whatever ends the search (out of memory, a kernel's size limit, the
    # cap) is its end, not a failure of the section.
    status = status_of(runs[:3], ("ok", "skipped"))
    if status == "ok" and largest is None:  # no batch measured: say why
        status = status_of(search) if search else "timeout"
    return {"status": status, "runs": runs, "result": result, "line": line}


def fid(check: Check) -> dict[str, Any]:
    """FID and class accuracy of a short quickstart run (the fid CLI, fashion features)."""
    if not FASHION_CLASSIFIER.is_file():
        return {"status": "skipped", "runs": [], "result": None,
                "line": f"skipped: no fashion classifier at {FASHION_CLASSIFIER}"}
    steps = 5 if check.smoke else 300
    run_dir, out_json = check.work / "fid" / "run", check.out / "fid" / "fid.json"
    train = trainer_command(QUICKSTART, [*check.model, *QUIET, f"train.max_steps={steps}",
                                         f"train.log_every={max(1, steps // 10)}",
                                         f"train.ckpt_every={NEVER}", "train.resume=never",
                                         f"out_dir={run_dir}", f"data.root={check.data_root}"], 1)
    sampling = (["--num-samples", "20", "--batch-size", "10", "--sampler", "ddim", "--steps", "5"]
                if check.smoke else ["--num-samples", "2000", "--batch-size", "1000"])
    # fid reads the real images from its --data-root only (never the checkpoint's paths)
    score = [sys.executable, "-m", "ddp_diffusion", "fid", "--run", str(run_dir), "--features",
             "fashion", "--data-root", str(check.data_root), *sampling, "--out", str(out_json)]
    logs = check.out / "fid"
    runs = run_chains(check, [[(train, logs / "train.log"), (score, logs / "fid.log")]])[0]
    result = json.loads(out_json.read_text()) if out_json.is_file() else None
    line = (f"FID {result['fid']:.2f}, class accuracy {result.get('class_accuracy', 0):.3f} "
            f"({result['num_samples']} samples, {result['sampler']} {result['steps']}) after "
            f"{result['step']} steps" if result else "no FID: a run did not finish")
    return {"status": status_of(runs), "runs": runs, "result": result, "line": line}


SECTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "host_syncs": host_syncs, "resume": resume, "throughput": throughput, "fid": fid}


# ------------------------------------------------------------------------------------- driver


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a short page: the machine, then a line per section."""
    m = summary["machine"]
    caps = ", ".join(f"{k} {v}" for k, v in summary["caps_s"].items())
    lines = [f"# GPU check {summary['started']}{' (smoke)' if summary['smoke'] else ''}", "",
             f"{m.get('gpu', m['cpu'])}, {m['cores']} CPU cores, torch {m['torch']}. Caps in "
             f"seconds: {caps}, + {summary['startup_s']} start-up; {summary['jobs']} runs at "
             "once where they are independent. Logs: one per run under each section's folder.",
             "",
             "| section | status | seconds | cap | result |", "|---|---|---:|---:|---|"]
    for name, s in summary["sections"].items():
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {s['cap_s']} | "
                     f"{s.get('line', '')} |")
    return "\n".join(lines) + "\n"


def run_section(check: Check, name: str, cap: float) -> None:
    """Run one section within its cap; record whatever happens, never raise past it."""
    sections = check.summary["sections"]
    sections[name] = {"status": "running", "cap_s": cap}
    check.write_summary()
    t0 = time.monotonic()
    check.deadline = min(t0 + cap, T0 + check.summary["total_s"] - STARTUP_S)
    shutil.rmtree(check.work / name, ignore_errors=True)  # a rerun must not resume old runs
    try:
        sections[name].update(SECTIONS[name](check))
    except Exception as e:  # a broken section is a result too; the next one still runs
        sections[name].update(status="failed", error=f"{type(e).__name__}: {e}",
                              traceback=traceback.format_exc()[-4000:],
                              line=f"failed: {type(e).__name__}: {e}")
    except BaseException:  # stopped from outside: say so in the summary, then stop
        sections[name].update(status="interrupted", line="interrupted")
        raise
    finally:
        sections[name]["seconds"] = round(time.monotonic() - t0, 1)
        check.write_summary()
    s = sections[name]
    bad = [r for r in s.get("runs", []) if r["status"] in ("failed", "timeout")]
    if bad:  # the first run that went wrong and why, so the line alone points at the log
        s["line"] += f" [{bad[0]['log']}: {bad[0].get('reason', '')}]"
        check.write_summary()
    print(f"== {name}: {s['status']} in {s['seconds']:.0f}/{cap} s: {s['line']}", flush=True)


def stop(signum: int, _frame: Any) -> None:
    """On SIGTERM/SIGINT: end the running subprocesses (their own sessions), then exit."""
    STOPPING.set()
    with LIVE_LOCK:
        procs = list(LIVE)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="data", help="holds FashionMNIST/raw (the IDX files)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "gpu" / f"check-{today}")
    p.add_argument("--work", type=Path, help="run directories, one subfolder per section, "
                   "replaced when it runs (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="toy sizes, for a CPU (the tests)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--total", type=float, default=480, help="seconds for everything")
    p.add_argument("--jobs", type=int, help="runs at once where they are independent "
                   "(default: 8 on a GPU, 2 on a CPU)")
    args = p.parse_args(argv)
    names = args.sections.split(",")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no GPU here: the sizes are a GPU's; --smoke runs toy sizes", flush=True)
    caps = SMOKE_CAPS if args.smoke else CAPS
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check = Check(out=args.out.resolve(), work=(args.work or Path(tmp)).resolve(),
                      data_root=Path(args.data_root).resolve(), cuda=cuda, smoke=args.smoke,
                      jobs=args.jobs or (8 if cuda else 2), deadline=0.0)
        check.summary = {"machine": machine(torch.device("cuda" if cuda else "cpu")),
                         "device": "cuda" if cuda else "cpu", "smoke": args.smoke,
                         "started": datetime.datetime.now(datetime.UTC).isoformat(
                             timespec="seconds"),
                         "total_s": args.total, "startup_s": STARTUP_S, "jobs": check.jobs,
                         "caps_s": {n: caps[n] for n in names}, "sections": {}}
        for name in names:
            run_section(check, name, caps[name])
    statuses = {n: s["status"] for n, s in check.summary["sections"].items()}
    print(json.dumps({"summary": str(check.out / "summary.json"), **statuses}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
