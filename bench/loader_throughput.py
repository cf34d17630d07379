"""Can the stream loader keep up? Images/s it delivers against images/s training consumes.

    python bench/loader_throughput.py                   # 50,000 JPEGs, about 10 min on 2 cores
    python bench/loader_throughput.py --images 2000 --train-steps 3 --out /tmp/lt  # smoke test

Generates (once, reused) an image folder of `--images` 64x64 RGB JPEGs in 10 class folders,
then measures on this machine:
- the first-start check of every file (decoded once, then cached) and a cached start;
- the stream loader alone: images/s delivered to the training process, for 1, 2, ... workers
  (batch 128, after warm-up batches);
- training of configs/image_folder.yaml's UNet (64x64 RGB; no torch.compile on CPU) fed by the
  memory loader and by the stream loader: if the stream loader stalled training, its images/s
  would be lower.
Writes OUT/loader_throughput.json and .md (OUT defaults to docs/).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from train_throughput import TIMING, machine, step_seconds, trainer_command  # bench/

from ddp_diffusion import config, rundir
from ddp_diffusion.data import StepPlan, StreamLoader
from ddp_diffusion.diffusion import build_denoiser
from ddp_diffusion.model import forward_gflops
from ddp_diffusion.precision import resolve_precision
from ddp_diffusion.sources import open_source

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "image_folder.yaml"
CLASSES = 10
SIZE = 64
H100_BF16_TFLOPS = 989  # dense bf16 peak of an H100 SXM, for the workers-per-GPU estimate


def write_jpeg(job: tuple[Path, int]) -> None:
    """One 64x64 RGB JPEG of smooth random colour (upsampled 8x8 noise), seeded by its index."""
    path, i = job
    rng = np.random.default_rng(i)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    small.resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(path, quality=90)


def make_folder(root: Path, n: int) -> Path:
    """`n` JPEGs in CLASSES class folders (kept between runs: generating takes a while)."""
    jobs = [(root / f"class_{i % CLASSES}" / f"{i:06d}.jpg", i) for i in range(n)]
    todo = [job for job in jobs if not job[0].is_file()]
    for c in range(CLASSES):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    if todo:
        with multiprocessing.Pool() as pool:
            pool.map(write_jpeg, todo, chunksize=256)
    return root


def loader_rate(data: config.DataConfig, workers: int, steps: int, batch: int = 128) -> float:
    """Images/s the stream loader delivers, after 3 warm-up batches, with no training."""
    source = open_source(data, SIZE, workers)
    plan = StepPlan(len(source), batch, 0, torch.device("cpu"), hflip=True)
    loader = StreamLoader(source, plan, 0, 1, 1, 1000, 0.1, 0, steps + 3, workers)
    for step in range(3):
        loader.micro_batches(step)
    t0 = time.perf_counter()
    for step in range(3, steps + 3):
        loader.micro_batches(step)
    return steps * batch / (time.perf_counter() - t0)


def train_rate(folder: Path, data_root: Path, work: Path, loader: str, steps: int,
               batch: int) -> tuple[float, float]:
    """Median images/s of training the recipe's UNet on CPU fed by a loader, and the largest
    fraction of a step that training waited for images (metrics.jsonl's data_wait)."""
    out = work / f"train-{loader}"
    overrides = [*TIMING, f"data.path={folder}", f"data.root={data_root}", f"out_dir={out}",
                 f"data.loader={loader}", "data.num_workers=1", "train.compile=false",
                 f"train.batch_size={batch}", f"train.max_steps={steps + 2}"]
    subprocess.run(trainer_command(RECIPE, overrides, 1), check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / rundir.METRICS).read_text().splitlines()]
    wait = max(r["data_wait"] for r in records if r["step"] > 2)
    return batch / statistics.median(step_seconds(out, batch, warmup=2)), wait


def markdown(r: dict[str, Any]) -> str:
    m, t = r["machine"], r["training"]
    verdict = ("**it does not stall training on this CPU**" if t["stream"][1] < 0.01
               else "**it stalls training here**: add workers")
    rows = "\n".join(f"| {w} | {rate:,.0f} | {rate / w:,.0f} |"
                     for w, rate in r["loader_images_per_s"].items())
    return f"""# Stream loader throughput

Measured by `python bench/loader_throughput.py` on {m['cpu']} ({m['cores']} cores, CPU flags
{m['cpu_flags']}), torch {m['torch']}, {m['date']}: an image folder of {r['images']:,} {SIZE}x{SIZE}
RGB JPEGs in {CLASSES} class folders.

**Start-up.** The first start decodes every file once to check it: {r['check_s']:.1f} s
({r['images'] / r['check_s']:,.0f} images/s with {m['cores']} workers). The result is cached by
the folder's fingerprint; the next start takes {r['cached_open_s']:.2f} s.

**The loader alone** (batch 128, random flips, into the training process):

| workers | images/s delivered | per worker |
| --- | --- | --- |
{rows}

**Training** the UNet of `configs/image_folder.yaml` ({r['model_gflop']:.1f} GFLOP forward per
image, {t['precision']}, no compile, batch {t['batch']}) on this CPU:

| loader | training images/s | most of a step spent waiting for images |
| --- | --- | --- |
| memory (decoded beforehand) | {t['memory'][0]:.2f} | {t['memory'][1]:.1%} |
| stream, 1 worker | {t['stream'][0]:.2f} | {t['stream'][1]:.1%} |

The stream loader alone delivers {r['headroom']:,.0f}x what training consumes here. Fed by it,
training waited for images at most {t['stream'][1]:.1%} of any step ({verdict}); it ran at
{t['stream'][0] / t['memory'][0]:.2f}x the speed of training from memory, whose difference is the
worker sharing this machine's {m['cores']} cores with training.

**Workers per GPU.** A GPU consumes far more images per second than this CPU. At
{r['gpu_fraction']:.0%} of an H100's dense bf16 peak ({H100_BF16_TFLOPS} TFLOP/s) this model
trains at about {r['gpu_images_per_s']:,.0f} images/s (3 x {r['model_gflop']:.1f} GFLOP per
image). One worker here decodes {r['per_worker']:,.0f} images/s, so a GPU needs about
**{r['workers_per_gpu']} workers** (`data.num_workers`, per GPU process) for 64x64 JPEGs. Larger
or slower-to-decode images need proportionally more. Sets that fit in 2 GiB at the model's size
use the memory loader (`data.loader: auto`) and need no workers after start-up.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--work", default="/tmp/ddp-diffusion-loader-bench")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--loader-steps", type=int, default=40)
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--gpu-fraction", type=float, default=0.3,
                   help="assumed fraction of the GPU's bf16 peak, for the workers-per-GPU line")
    p.add_argument("--out", default=str(REPO / "docs"))
    args = p.parse_args(argv)
    work = Path(args.work)
    folder = make_folder(work / f"jpegs-{args.images}", args.images)
    data_root = work / "data"
    data = config.DataConfig(dataset="image_folder", path=str(folder), root=str(data_root))
    for cached in data_root.glob("checked/*.json"):
        cached.unlink()  # time the first-start check, not a cached one
    cores = machine(torch.device("cpu"))["cores"]
    t0 = time.perf_counter()
    open_source(data, SIZE, num_workers=cores)
    check_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    open_source(data, SIZE, num_workers=cores)
    cached_open_s = time.perf_counter() - t0

    rates = {w: loader_rate(data, w, args.loader_steps) for w in args.workers}
    training = {loader: train_rate(folder, data_root, work, loader, args.train_steps,
                                   args.train_batch) for loader in ("memory", "stream")}
    cfg = config.load(RECIPE, [f"data.path={folder}"])
    model = build_denoiser(config.with_data_shape(cfg.model, CLASSES, 3), cfg.diffusion.steps)
    gflop = forward_gflops(model, SIZE, 3)
    per_worker = rates[min(rates)] / min(rates)
    gpu_rate = args.gpu_fraction * H100_BF16_TFLOPS * 1e3 / (3 * gflop)
    flags = sorted({f for f in ("avx2", "avx512_bf16", "amx_bf16")
                    if f in Path("/proc/cpuinfo").read_text()})
    result = {
        "machine": {**machine(torch.device("cpu")), "cpu_flags": " ".join(flags) or "-"},
        "images": args.images, "check_s": check_s, "cached_open_s": cached_open_s,
        "loader_images_per_s": rates, "per_worker": per_worker,
        "training": {**training, "batch": args.train_batch,
                     "precision": resolve_precision(cfg.train.precision, torch.device("cpu"))},
        "headroom": rates[min(rates)] / training["memory"][0], "model_gflop": gflop,
        "gpu_fraction": args.gpu_fraction, "gpu_images_per_s": gpu_rate,
        "workers_per_gpu": int(np.ceil(gpu_rate / per_worker)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "loader_throughput.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
