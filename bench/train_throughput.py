"""Training throughput: the code-along's loop (the baseline) against our trainer, A B A B.

    python bench/train_throughput.py --data-root /tmp/data            # full: 3 rounds
    python bench/train_throughput.py --data-root /tmp/data --quick    # < 5 min on 2 CPU cores
    python bench/train_throughput.py --quick --steps 2 --batch-size 8 --out /tmp/t  # smoke test

Every variant runs as its own process (so each has its own peak RSS and thread pool), after
`--warmup` untimed steps, for `--steps` timed steps; the variants alternate round by round
(A B C A B C ...) so that machine drift hits all of them alike. The baseline is
bench/codealong.py; ours is `python -m ddp_diffusion train configs/seed.yaml` (the same model,
batch and optimizer) with per-step times read back from its metrics.jsonl. The same run also
measures the machine's matmul peak in fp32 and bf16, so the achieved GFLOP/s reads as a
fraction of the limit. Writes OUT/train_throughput_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddp_diffusion import config, rundir
from ddp_diffusion.diffusion import Diffusion, build_denoiser

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "configs" / "seed.yaml"
RECOMMENDED = REPO / "configs" / "fashion_mnist.yaml"
QUICKSTART = REPO / "configs" / "quickstart_cpu.yaml"

# name -> (config file, overrides, ranks); "codealong" is the baseline script.
CPU_VARIANTS: dict[str, tuple[Path, list[str], int]] = {
    "codealong": (SEED, [], 1),
    "ours fp32": (SEED, ["train.precision=fp32"], 1),
    "ours fp32 channels_last": (SEED, ["train.precision=fp32", "train.channels_last=true"], 1),
    "ours fp32 2 ranks x 1 thread": (SEED, ["train.precision=fp32"], 2),
    "ours bf16 autocast": (SEED, ["train.precision=bf16"], 1),
    "recommended UNet fp32": (RECOMMENDED, ["train.precision=fp32", "train.compile=false",
                                            "model.dropout=0"], 1),
    "quickstart UNet fp32": (QUICKSTART, ["train.precision=fp32"], 1),
    "quickstart UNet fp32 2 ranks x 1 thread": (QUICKSTART, ["train.precision=fp32"], 2),
}
GPU_VARIANTS: dict[str, tuple[Path, list[str], int]] = {
    "codealong": (SEED, [], 1),
    "ours fp32 (tf32)": (SEED, ["train.precision=fp32"], 1),
    "ours bf16": (SEED, ["train.precision=bf16"], 1),
    "ours bf16 channels_last": (SEED, ["train.precision=bf16", "train.channels_last=true"], 1),
    "ours bf16 channels_last compile": (SEED, ["train.precision=bf16", "train.channels_last=true",
                                               "train.compile=true"], 1),
    "recommended UNet bf16": (RECOMMENDED, ["train.precision=bf16", "train.compile=false",
                                            "model.dropout=0"], 1),
}
QUICK = ("codealong", "ours fp32")
DEFAULT_CPU = ("codealong", "ours fp32", "ours fp32 channels_last",
               "ours fp32 2 ranks x 1 thread", "recommended UNet fp32", "quickstart UNet fp32",
               "quickstart UNet fp32 2 ranks x 1 thread")


def matmul_gflops(dtype: torch.dtype, device: torch.device, max_n: int) -> float:
    """Measured GFLOP/s of a square matmul, sized so one product takes about a second."""
    def timed(n: int, reps: int) -> float:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9

    n, rate = 256, timed(256, 1)
    while n < max_n and 2 * (2 * n) ** 3 / (rate * 1e9) < 1.0:  # grow while a product is < 1 s
        n *= 2
        rate = timed(n, 1)
    return timed(n, 10 if device.type == "cuda" else 2)


def sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA timing needs it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_gflops(cfg_path: Path, overrides: list[str]) -> float:
    """Forward + backward GFLOP per training image of a config's model (FLOP counter)."""
    cfg = config.load(cfg_path, overrides)
    m = config.with_data_shape(cfg.model, num_classes=10, channels=1)  # Fashion-MNIST
    model = build_denoiser(m, Diffusion(cfg.diffusion).num_timesteps)
    b, s = 2, cfg.model.image_size
    x, t, y = torch.randn(b, 1, s, s), torch.randint(0, 1000, (b,)), torch.arange(b)
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, y, keys=torch.arange(b))  # keys: the per-sample dropout masks
        (out.prediction.square().mean() + out.variance_value.square().mean()).backward()
    return counter.get_total_flops() / b / 1e9


def run_process(cmd: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """Run a command; (exit code, peak RSS in MB of its largest process, stderr tail)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-3000:]
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, tail


# Overrides that make a short run of our trainer a clean timing: a log record (with images/s)
# every step, no sample grids, no checkpoint before the end, a fresh start, no W&B.
TIMING = ["train.log_every=1", "train.sample_every=0", f"train.ckpt_every={10**9}",
          "train.keep_last=1", "train.resume=never", "tracking.wandb=disabled"]


def trainer_command(cfg_path: Path, overrides: list[str], ranks: int) -> list[str]:
    """`ddp-diffusion train` on a config: one process, or torchrun with `ranks` CPU ranks."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={ranks}", "-m", "ddp_diffusion"] if ranks > 1
                else [sys.executable, "-m", "ddp_diffusion"])
    return [*launcher, "train", "--config", str(cfg_path), *overrides]


def step_seconds(run_dir: Path, batch: int, warmup: int) -> list[float]:
    """Seconds of each step after `warmup`, from a run's metrics.jsonl (train.log_every=1)."""
    records = [json.loads(line) for line in (run_dir / rundir.METRICS).read_text().splitlines()]
    return [batch / r["images_per_s"] for r in records if r["step"] > warmup]


def run_variant(name: str, spec: tuple[Path, list[str], int], args: argparse.Namespace,
                work: Path, device: str) -> dict[str, Any]:
    """One timed segment of a variant: per-step seconds and peak RSS."""
    cfg_path, overrides, ranks = spec
    out = work / f"{name.replace(' ', '_').replace(',', '')}-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if name == "codealong":
        cmd = [sys.executable, str(REPO / "bench" / "codealong.py"), "--data-root",
               args.data_root, "--device", device, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--json", str(out.with_suffix(".json"))]
    else:
        if cfg_path == SEED:  # the code-along's model runs at the code-along's batch
            overrides = [*overrides, f"train.batch_size={args.batch_size}"]
        cmd = trainer_command(cfg_path, [*overrides, *TIMING, f"out_dir={out}",
                                         f"data.root={args.data_root}",
                                         f"train.max_steps={args.warmup + args.steps}"], ranks)
    code, rss, tail = run_process(cmd, env)
    if code != 0:
        raise RuntimeError(f"{name} failed with exit code {code}:\n{tail}")
    if name == "codealong":
        result = json.loads(out.with_suffix(".json").read_text())
        return {"step_s": result["step_s"], "batch_size": result["batch_size"], "peak_rss_mb": rss}
    batch = config.load(cfg_path, overrides).train.batch_size
    return {"step_s": step_seconds(out, batch, args.warmup), "batch_size": batch,
            "peak_rss_mb": rss}


def summarize(name: str, segments: list[dict[str, Any]], gflop: float, peak: float
              ) -> dict[str, Any]:
    """Median and spread of images/s over all timed steps, achieved GFLOP/s, peak RSS."""
    rates = [seg["batch_size"] / s for seg in segments for s in seg["step_s"]]
    median = statistics.median(rates)
    return {
        "variant": name, "images_per_s": median, "min": min(rates), "max": max(rates),
        "steps_timed": len(rates), "batch_size": segments[0]["batch_size"],
        "train_gflop_per_image": gflop, "achieved_gflops": median * gflop,
        "fraction_of_peak": median * gflop / peak,
        "peak_rss_mb": max(seg["peak_rss_mb"] for seg in segments),
    }


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):  # what decides bf16 speed on a CPU
                flags = " ".join(f for f in ("avx2", "avx512_bf16", "amx_bf16")
                                 if f in line.split())
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_flags": flags, "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table plus the machine line."""
    m, peaks = result["machine"], result["peak_gflops"]
    peak_text = ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
    lines = [
        f"Measured {m['date']} on {m.get('gpu', m['cpu'])} ({m['cores']} CPU cores, "
        f"torch {m['torch']}); matmul peak GFLOP/s: {peak_text}. {result['rounds']} round(s) "
        f"of {result['warmup']} warm-up + {result['steps']} timed steps per variant, alternating.",
        "",
        "| variant | batch | images/s (median) | min–max | vs first row | GFLOP/image "
        "| achieved GFLOP/s | of peak | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = result["variants"][0]["images_per_s"]
    for v in result["variants"]:
        lines.append(
            f"| {v['variant']} | {v['batch_size']} | {v['images_per_s']:.1f} | "
            f"{v['min']:.1f}–{v['max']:.1f} | {v['images_per_s'] / base:.2f}x | "
            f"{v['train_gflop_per_image']:.1f} | {v['achieved_gflops']:.0f} | "
            f"{v['fraction_of_peak']:.0%} | {v['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="data")
    p.add_argument("--quick", action="store_true", help="baseline vs ours only, one round")
    p.add_argument("--steps", type=int, help="timed steps per segment (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, help="A B A B rounds (default 3; quick 1)")
    p.add_argument("--batch-size", type=int, default=192, help="the code-along's batch")
    p.add_argument("--variants", help="comma-separated names (see CPU_VARIANTS, GPU_VARIANTS); "
                   "the first is the baseline of the ratios (default: codealong)")
    p.add_argument("--out", type=Path, default=REPO / "docs")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 3)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = GPU_VARIANTS if device.type == "cuda" else CPU_VARIANTS
    names = (args.variants.split(",") if args.variants
             else QUICK if args.quick else DEFAULT_CPU if device.type == "cpu" else tuple(table))
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(table)}")

    max_n = 8192 if device.type == "cuda" else 4096
    peak = {"fp32": matmul_gflops(torch.float32, device, max_n),
            "bf16": matmul_gflops(torch.bfloat16, device, max_n)}
    if device.type == "cuda":  # our trainer runs fp32 matmuls and convolutions as TF32 there
        torch.backends.cuda.matmul.allow_tf32 = True
        peak["tf32"] = matmul_gflops(torch.float32, device, max_n)
    segments: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        for r in range(args.rounds):
            for name in names:
                seg = run_variant(name, table[name], args, Path(tmp), device.type)
                segments[name].append(seg)
                rate = statistics.median(seg["batch_size"] / s for s in seg["step_s"])
                print(f"round {r + 1}/{args.rounds} {name}: {rate:.1f} images/s", flush=True)
    variants = []
    for name in names:
        cfg_path, overrides, _ = table[name]
        # On CUDA fp32 convolutions run as TF32 (cuDNN's default, the code-along's too).
        precision = ("bf16" if "train.precision=bf16" in overrides
                     else "tf32" if device.type == "cuda" else "fp32")
        variants.append(summarize(name, segments[name], train_gflops(cfg_path, overrides),
                                  peak[precision]))
    result = {"machine": machine(device), "device": device.type, "peak_gflops": peak,
              "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
              "quick": args.quick, "variants": variants,
              "speedup": variants[1]["images_per_s"] / variants[0]["images_per_s"]}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"train_throughput_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(json.dumps({"speedup": result["speedup"], "json": str(stem.with_suffix(".json"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
