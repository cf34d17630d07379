"""FID and class accuracy vs sampler, evaluations per image and guidance on a trained run.

    python bench/fid_vs_steps.py --run runs/x     # the GRID below, guidance 0/1/2, 3 seeds
    python bench/fid_vs_steps.py --run runs/x --quick --out-dir /tmp/q   # a smoke run
    torchrun --nproc_per_node 4 bench/fid_vs_steps.py --run runs/x       # every rank samples

Writes OUT_DIR/evaluation.md (the model, its training budget, the settings, the floor of real
images at the same sample count, and the table) and OUT_DIR/fid_vs_steps.png (a line per sampler
against evaluations per image). Every point of a seed starts from the same noise; the headline
rows are repeated on more seeds for their spread."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import statistics
from pathlib import Path
from typing import Any, get_args

import torch
from PIL import Image, ImageDraw

from ddp_diffusion import distributed
from ddp_diffusion.config import Sampler
from ddp_diffusion.errors import UserError
from ddp_diffusion.fid import evaluate, real_fid
from ddp_diffusion.model import count_parameters
from ddp_diffusion.precision import resolve_precision
from ddp_diffusion.runs import load_run

GRID = [("ddpm", 1000), ("ddpm", 250), ("ddpm", 50), ("ddpm", 25), ("ddim", 100), ("ddim", 50),
        ("ddim", 25), ("ddim", 10), ("dpm++", 25), ("dpm++", 10), ("unipc", 25), ("unipc", 10),
        ("sde-dpm++", 50), ("sde-dpm++", 25), ("sde-dpm++", 10)]
GUIDANCES = [0.0, 1.0, 2.0]
# The rows whose spread over sampling seeds the page reports: the reference and the few-step
# candidates.
HEADLINE = [("ddpm", 250), ("sde-dpm++", 25), ("dpm++", 25), ("ddim", 25)]
QUICK_GRID = [("ddpm", 20), ("ddim", 10), ("ddim", 5), ("dpm++", 5), ("sde-dpm++", 5)]
QUICK_GUIDANCES = [0.0, 2.0]
QUICK_HEADLINE = [("sde-dpm++", 5)]
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rows: list[dict[str, Any]],
           key: str, samplers: list[str], title: str) -> None:
    """One chart: `key` against network evaluations per image (log scale), a line per sampler."""
    x0, y0, x1, y1 = box
    top = max(r[key] for r in rows) * 1.1 or 1.0
    evals = sorted({r["steps"] for r in rows})
    lo, hi = math.log(evals[0]), math.log(evals[-1])

    def x_of(n: int) -> float:
        return x0 + 20 + (x1 - x0 - 40) * ((math.log(n) - lo) / (hi - lo) if hi > lo else 0.5)

    draw.rectangle(box, outline="black")
    draw.text((x0, y0 - 16), title, fill="black")
    for k in range(5):
        y = y1 - (y1 - y0) * k / 4
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.text((x0 - 44, y - 6), f"{top * k / 4:.3g}", fill="black")
    for n in evals:
        draw.text((x_of(n) - 8, y1 + 6), str(n), fill="black")
    for colour, sampler in zip(COLOURS, samplers, strict=False):
        pts = sorted((x_of(r["steps"]), y1 - (y1 - y0) * r[key] / top)
                     for r in rows if r["sampler"] == sampler)
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """FID and class accuracy against evaluations per image, a line per sampler, a row of the
    two panels per guidance (the first seed's rows)."""
    rows = [r for r in rows if r["seed"] == rows[0]["seed"]]
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    guidances = sorted({r["guidance"] for r in rows})
    img = Image.new("RGB", (1100, 380 * len(guidances) + 60), "white")
    draw = ImageDraw.Draw(img)
    for i, g in enumerate(guidances):
        sub, top = [r for r in rows if r["guidance"] == g], 40 + 380 * i
        _panel(draw, (70, top, 520, top + 320), sub, "fid", samplers,
               f"FID, guidance {g:g} (x: network evaluations per image)")
        _panel(draw, (620, top, 1070, top + 320), sub, "class_accuracy", samplers,
               f"class accuracy, guidance {g:g}")
    for i, (colour, sampler) in enumerate(zip(COLOURS, samplers, strict=False)):
        y = 380 * len(guidances) + 30
        draw.line((70 + 150 * i, y, 95 + 150 * i, y), fill=colour, width=3)
        draw.text((100 + 150 * i, y - 6), sampler, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def spread(rows: list[dict[str, Any]], r: dict[str, Any]) -> str:
    """'mean ± sd (n seeds)' of the FID of a configuration over the seeds measured, or ''."""
    fids = [o["fid"] for o in rows if (o["sampler"], o["steps"], o["guidance"])
            == (r["sampler"], r["steps"], r["guidance"])]
    if len(fids) < 2:
        return ""
    return f"{statistics.mean(fids):.3f} ± {statistics.stdev(fids):.3f} ({len(fids)} seeds)"


def report(rows: list[dict[str, Any]], about: dict[str, Any], png: Path) -> str:
    """The markdown page: what was measured on what, then the table and the plot."""
    first = [r for r in rows if r["seed"] == rows[0]["seed"]]
    lines = [
        "# Evaluation: FID and class accuracy vs sampler, evaluations per image and guidance", "",
        f"Written by `bench/fid_vs_steps.py` on {about['date']} ({about['device']}, world size "
        f"{rows[0]['world_size']}, sampling in {rows[0]['precision']}"
        f"{', **quick mode**' if about['quick'] else ''}).", "",
        *([about["note"], ""] if about["note"] else []),
        f"- model: run `{about['run']}`, {about['model']} with {about['params']:.2f}M "
        f"parameters, EMA weights of step {about['step']} ({about['images']:,} training "
        f"images, global batch {about['batch']})",
        f"- FID: {rows[0]['num_samples']} generated images (balanced classes) against the "
        f"{rows[0]['reference_samples']} real {rows[0]['reference']} images, "
        f"`{rows[0]['features']}` features; seed {rows[0]['seed']}, DDIM eta {rows[0]['eta']}; "
        "every step is one network evaluation per image (the guided conditional and "
        "unconditional branch run as one batch). FIDs are comparable only at the same sample "
        "count and features",
        "- class accuracy: the fraction of generated images the shipped classifier assigns to "
        "the requested class",
        (f"- floor: {about['floor']['num_samples']} real {about['floor']['split']} images score "
         f"FID {about['floor']['fid']:.3f} against the same reference with the same features: "
         "what a perfect model would score at this sample count" if about["floor"] else
         "- floor: not measured (the other split has fewer images than the sample count)"), "",
        "| sampler | evaluations | guidance | FID | FID over seeds | class accuracy | "
        "samples/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['fid']:.3f} | "
              f"{spread(rows, r)} | {r['class_accuracy']:.3f} | {r['samples_per_s']:.1f} |"
              for r in first]
    lines += ["", f"![FID and class accuracy vs evaluations per image]({png.name})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--checkpoint", help="default: newest in RUN/checkpoints")
    parser.add_argument("--num-samples", type=int, help="default 10000 (quick: 200)")
    parser.add_argument("--data-root", help="where the real images are (default: the run's)")
    parser.add_argument("--features", choices=("fashion", "inception"), default="fashion")
    parser.add_argument("--reference", choices=("train", "test"), default="train")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds (seed, seed+1, ...) "
                        f"for the headline rows {HEADLINE}; the others use --seed")
    parser.add_argument("--quick", action="store_true",
                        help=f"only {QUICK_GRID} at guidance {QUICK_GUIDANCES}")
    parser.add_argument("--out-dir", default="docs")
    parser.add_argument("--samplers", nargs="+", default=list(get_args(Sampler)),
                        choices=get_args(Sampler), help="only these rows of the grid")
    parser.add_argument("--note", default="", help="a line for the page, e.g. how the model "
                        "was trained")
    parser.add_argument("--precision", default="auto", help="sampling precision (auto: bf16 on "
                        "GPUs with native bf16, else fp32)")
    args = parser.parse_args()

    env = distributed.init()
    try:
        cfg, denoiser, diffusion, step, _ = load_run(Path(args.run), args.checkpoint and
                                                  Path(args.checkpoint), True, env.device)
        cfg.data.root = args.data_root or cfg.data.root
        grid, guidances = (QUICK_GRID, QUICK_GUIDANCES) if args.quick else (GRID, GUIDANCES)
        grid = [c for c in grid if c[1] <= diffusion.num_timesteps and c[0] in args.samplers]
        num_samples = args.num_samples or (200 if args.quick else 10000)
        precision = resolve_precision(args.precision, env.device)
        out = Path(args.out_dir)
        png = out / "fid_vs_steps.png"
        about = {"run": args.run, "model": cfg.model.name, "step": step,
                 "params": count_parameters(denoiser) / 1e6,
                 "images": step * cfg.train.batch_size, "batch": cfg.train.batch_size,
                 "quick": args.quick, "date": datetime.date.today().isoformat(),
                 "note": args.note,
                 "device": (torch.cuda.get_device_name(env.device) if env.device.type == "cuda"
                            else f"CPU {platform.processor() or platform.machine()}, "
                                 f"{torch.get_num_threads()} threads")}
        base = dataclasses.replace(cfg.fid, num_samples=num_samples, features=args.features,
                                   reference=args.reference, batch_size=args.batch_size)
        other = "test" if args.reference == "train" else "train"
        try:
            about["floor"] = real_fid(cfg, base, other) if env.is_main else None
        except UserError:
            about["floor"] = None
        if about["floor"]:
            print(f"floor: FID {about['floor']['fid']:.3f} of {num_samples} real {other} images",
                  flush=True)
        rows: list[dict[str, Any]] = []
        # Cheapest first, and the page is rewritten after every point: a run stopped early
        # still leaves every finished point on disk. Then the headline rows on more seeds.
        points = [(sampler, steps, g, args.seed)
                  for sampler, steps in sorted(grid, key=lambda c: c[1]) for g in guidances]
        headline = QUICK_HEADLINE if args.quick else HEADLINE
        points += [(sampler, steps, g, args.seed + k) for k in range(1, args.seeds)
                   for sampler, steps in headline if (sampler, steps) in grid for g in guidances]
        for sampler, steps, g, seed in points:
            fc = dataclasses.replace(base, sampler=sampler, steps=steps, guidance=g)
            rows.append(evaluate(denoiser, diffusion, cfg, fc, seed, precision))
            if env.is_main:
                r = rows[-1]
                print(f"{sampler} {steps:4d} g={g:g} seed {seed}: FID {r['fid']:.3f}, class "
                      f"accuracy {r['class_accuracy']:.3f}, {r['samples_per_s']:.1f} samples/s",
                      flush=True)
                rows.sort(key=lambda r: (r["seed"] != args.seed,
                                         grid.index((r["sampler"], r["steps"])), r["guidance"]))
                plot(rows, png)
                (out / "evaluation.md").write_text(report(rows, about, png))
        if env.is_main:
            print(f"wrote {out / 'evaluation.md'} and {png}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
