"""Does `sample --out-npz` stay flat in memory as the sample count grows? Resident memory of
the export process while it writes N images, for N = 5,000 and 50,000.

    python bench/export_memory.py                        # about 12 min on 2 cores
    python bench/export_memory.py --quick --out /tmp/em  # a smoke run

A model of 64x64 RGB images (trained one step on a made-up image folder: the weights do not
matter, the shapes do) exports each count with 1-step DDIM, so that generation is cheap and
what is measured is the export: at 12 KiB an image, holding 50,000 would take 586 MiB. The
process's resident memory (VmRSS) is read every 0.1 s beside the number of chunk files on
disk, so the bench reports its growth while the chunks are written (a least-squares slope
against the images written) and during the final .npz stream, and the peak (ru_maxrss). An
export that kept its images would grow by the hold cost; a flat one by a few MiB of noise.
Writes OUT/export_memory.json and .md (OUT defaults to docs/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loader_throughput import make_folder  # bench/
from train_throughput import machine  # bench/

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
# A UNet so small that 1-step generation costs little next to writing 64x64 RGB images.
MODEL = ["model.channels=8", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
         "model.attention_resolutions=[]", "diffusion.steps=100"]
QUICK = {"counts": [300, 1200], "image_size": 32, "batch_size": 20}


def train_model(work: Path, image_size: int) -> Path:
    """A run directory of a one-step model of `image_size` RGB images."""
    run = work / f"run-{image_size}"
    if not (run / "checkpoints").is_dir():
        folder = make_folder(work / "images", 20)
        subprocess.run([sys.executable, "-m", "ddp_diffusion", "train", *MODEL,
                        f"model.image_size={image_size}", "data.dataset=image_folder",
                        f"data.path={folder}", f"data.root={work / 'data'}",
                        "train.batch_size=4", "train.max_steps=1", "train.sample_every=0",
                        "train.precision=fp32", "tracking.wandb=disabled", f"out_dir={run}"],
                       check=True, capture_output=True, cwd=REPO)
    return run


def rss_mib(pid: int) -> float | None:
    """A process's resident memory now (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def watch(cmd: list[str], parts: Path, log: Path) -> tuple[list[tuple[float, float, int]],
                                                          float, float]:
    """Run `cmd`, reading (seconds, RSS MiB, chunk files on disk) every 0.1 s; the readings,
    the peak RSS in MiB (ru_maxrss) and the wall seconds."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    readings = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        rss = rss_mib(proc.pid)
        chunks = len(list(parts.glob("chunk-*.npy"))) if parts.is_dir() else -1
        if rss is not None:
            readings.append((time.perf_counter() - t0, rss, chunks))
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    return readings, usage.ru_maxrss / 1024, time.perf_counter() - t0


def measure(run: Path, work: Path, n: int, image_size: int, batch: int) -> dict[str, Any]:
    """Export `n` images of `run` to an .npz and measure the process's memory while it does."""
    npz = work / f"samples-{n}.npz"
    npz.unlink(missing_ok=True)
    parts = npz.with_name(npz.name + ".parts")
    cmd = [sys.executable, "-m", "ddp_diffusion", "sample", "--run", str(run),
           "--num-samples", str(n), "--out-npz", str(npz), "--batch-size", str(batch),
           "--sampler", "ddim", "--steps", "1", "--guidance", "0", "--seed", "0"]
    readings, peak, seconds = watch(cmd, parts, work / f"sample-{n}.log")
    chunks = -(-n // batch)
    # Generation: from the first chunk on disk (the model and buffers are warm) to the last.
    writing = [(c, rss) for _, rss, c in readings if 1 <= c < chunks]
    done = next((i for i, (_, _, c) in enumerate(readings) if c == chunks), len(readings))
    streaming = [rss for _, rss, _ in readings[done:]]  # then the chunks are removed
    # The least and most resident memory in each tenth of the chunks: a sawtooth (each chunk's
    # forward allocates and frees) that would rise with the images written if they were kept.
    by_tenth: dict[int, list[float]] = {}
    for c, rss in writing:
        by_tenth.setdefault(c * 10 // chunks, []).append(rss)
    tenths = [[min(v), max(v)] for _, v in sorted(by_tenth.items())]
    written = [c * batch for c, _ in writing]
    with np.load(npz) as f:  # an .npz is read whole (mmap_mode does not apply): not measured
        arr_0, arr_1 = f["arr_0"], f["arr_1"]
        layout = {"arr_0": [list(arr_0.shape), str(arr_0.dtype)],
                  "arr_1": [list(arr_1.shape), str(arr_1.dtype)]}
    npz.unlink()
    image_mib = image_size * image_size * 3 / MIB
    return {
        "num_samples": n, "chunks": chunks, "chunks_seen": max(c for _, _, c in readings),
        "readings": len(readings), "seconds": seconds, "hold_mib": n * image_mib,
        "peak_rss_mib": peak, "rss_min_max_by_tenth_mib": tenths,
        "rss_max_streaming_mib": max(streaming) if streaming else None,
        # least squares; it needs readings at two chunk counts at least
        "slope_mib_per_10k": (statistics.linear_regression(
            written, [rss for _, rss in writing]).slope * 1e4 if len(set(written)) > 1 else None),
        "hold_mib_per_10k": 1e4 * image_mib, "npz": layout}


def fmt(x: float | None) -> str:
    """A number of MiB or seconds for the table ('-' if not measured)."""
    return "-" if x is None else f"{x:.0f}"


def span(tenths: list[list[float]], k: int) -> str:
    """The least and most RSS in one tenth of the chunks ('-' if none was read)."""
    return f"{tenths[k][0]:.0f}-{tenths[k][1]:.0f}" if tenths else "-"


def markdown(result: dict[str, Any]) -> str:
    """The measurements as a table, with what they were measured on."""
    m, rows = result["machine"], result["rows"]
    lines = [f"Written by `bench/export_memory.py` on {m['date']} ({m['cpu']}, flags "
             f"{m['cpu_flags'] or '-'}, {m['cores']} cores, torch {m['torch']})"
             f"{', **quick mode**' if result['quick'] else ''}.", "",
             f"`sample --out-npz`, {result['image_size']}x{result['image_size']} RGB, chunks of "
             f"{result['batch_size']}, 1-step DDIM. RSS in MiB of the export process.", "",
             "| images | holding them would take | RSS in the first tenth of the chunks | in the "
             "last tenth | slope while writing (MiB per 10k images; holding: "
             f"{rows[0]['hold_mib_per_10k']:.0f}) | max RSS streaming the .npz | peak RSS | s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['num_samples']:,} | {r['hold_mib']:.0f} | "
              f"{span(r['rss_min_max_by_tenth_mib'], 0)} | "
              f"{span(r['rss_min_max_by_tenth_mib'], -1)} | {fmt(r['slope_mib_per_10k'])} | "
              f"{fmt(r['rss_max_streaming_mib'])} | {r['peak_rss_mib']:.0f} | "
              f"{r['seconds']:.0f} |" for r in rows]
    a, b = rows[0], rows[-1]
    lines += ["", f"Peak RSS at {b['num_samples']:,} images minus at {a['num_samples']:,}: "
              f"{b['peak_rss_mib'] - a['peak_rss_mib']:+.0f} MiB; holding the images would add "
              f"{b['hold_mib'] - a['hold_mib']:.0f} MiB."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")],
                   default=[5000, 50000])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=100, help="images per chunk")
    p.add_argument("--quick", action="store_true", help=f"smoke settings {QUICK}")
    p.add_argument("--work", help="where the model and exports go (default: a temporary folder)")
    p.add_argument("--out", default=str(REPO / "docs"))
    args = p.parse_args(argv)
    if args.quick:
        args.counts, args.image_size, args.batch_size = (QUICK["counts"], QUICK["image_size"],
                                                         QUICK["batch_size"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        run = train_model(work, args.image_size)
        result: dict[str, Any] = {"machine": machine(torch.device("cpu")), "quick": args.quick,
                                  "image_size": args.image_size, "batch_size": args.batch_size,
                                  "rows": []}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for n in args.counts:
            result["rows"].append(measure(run, work, n, args.image_size, args.batch_size))
            (out / "export_memory.json").write_text(json.dumps(result, indent=1) + "\n")
            (out / "export_memory.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
