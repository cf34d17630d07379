"""FID and class accuracy vs sampler, steps and guidance on a trained run: a table and a plot.

    python bench/fid_vs_steps.py --run runs/x        # DDPM 1000-25, DDIM 100-10, DPM++/UniPC 25/10
    python bench/fid_vs_steps.py --run runs/x --quick --out-dir /tmp/q   # a smoke run
    torchrun --nproc_per_node 4 bench/fid_vs_steps.py --run runs/x       # every rank samples

Writes OUT_DIR/evaluation.md (the model, its training budget, the settings and the table) and
OUT_DIR/fid_vs_steps.png. Every point uses the same seed, hence the same starting noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
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
from ddp_diffusion.sample import load_run

GRID = [("ddpm", 1000), ("ddpm", 250), ("ddpm", 50), ("ddpm", 25), ("ddim", 100), ("ddim", 50),
        ("ddim", 25), ("ddim", 10), ("dpm++", 25), ("dpm++", 10), ("unipc", 25), ("unipc", 10)]
GUIDANCES = [0.0, 1.0, 2.0, 4.0]
QUICK_GRID = [("ddpm", 20), ("ddim", 10), ("ddim", 5), ("dpm++", 5)]
QUICK_GUIDANCES = [0.0, 2.0]
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rows: list[dict[str, Any]],
           key: str, configs: list[tuple[str, int]], guidances: list[float]) -> None:
    """One line chart: `key` per sampler configuration, one line per guidance."""
    x0, y0, x1, y1 = box
    top = max(r[key] for r in rows) * 1.1 or 1.0
    draw.rectangle(box, outline="black")
    draw.text((x0, y0 - 16), key, fill="black")
    for k in range(5):
        y = y1 - (y1 - y0) * k / 4
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.text((x0 - 44, y - 6), f"{top * k / 4:.3g}", fill="black")
    xs = [x0 + 30 + (x1 - x0 - 60) * i / max(1, len(configs) - 1) for i in range(len(configs))]
    for x, (sampler, steps) in zip(xs, configs, strict=True):
        draw.text((x - 18, y1 + 6), f"{sampler} {steps}", fill="black")
    for colour, g in zip(COLOURS, guidances, strict=False):
        pts = [(x, y1 - (y1 - y0) * r[key] / top) for x, c in zip(xs, configs, strict=True)
               for r in rows if (r["sampler"], r["steps"]) == c and r["guidance"] == g]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels (FID, class accuracy) over the sampler configurations, a line per guidance."""
    configs = list(dict.fromkeys((r["sampler"], r["steps"]) for r in rows))
    guidances = list(dict.fromkeys(r["guidance"] for r in rows))
    img = Image.new("RGB", (1100, 420), "white")
    draw = ImageDraw.Draw(img)
    _panel(draw, (70, 40, 520, 360), rows, "fid", configs, guidances)
    _panel(draw, (620, 40, 1070, 360), rows, "class_accuracy", configs, guidances)
    for i, (colour, g) in enumerate(zip(COLOURS, guidances, strict=False)):
        draw.line((70 + 130 * i, 400, 95 + 130 * i, 400), fill=colour, width=3)
        draw.text((100 + 130 * i, 394), f"guidance {g:g}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def report(rows: list[dict[str, Any]], about: dict[str, Any], png: Path) -> str:
    """The markdown page: what was measured on what, then the table and the plot."""
    lines = [
        "# Evaluation: FID and class accuracy vs sampling steps and guidance", "",
        f"Written by `bench/fid_vs_steps.py` on {about['date']} ({about['device']}, world size "
        f"{rows[0]['world_size']}, sampling in {rows[0]['precision']}"
        f"{', **quick mode**' if about['quick'] else ''}).", "",
        *([about["note"], ""] if about["note"] else []),
        f"- model: run `{about['run']}`, {about['model']} with {about['params']:.2f}M "
        f"parameters, EMA weights of step {about['step']} ({about['images']:,} training "
        f"images, global batch {about['batch']})",
        f"- FID: {rows[0]['num_samples']} generated images (balanced classes) against the "
        f"{rows[0]['reference_samples']} real {rows[0]['reference']} images, "
        f"`{rows[0]['features']}` features; seed {rows[0]['seed']}, DDIM eta {rows[0]['eta']}",
        "- class accuracy: the fraction of generated images the shipped classifier assigns to "
        "the requested class",
        (f"- floor: {about['floor']['num_samples']} real {about['floor']['split']} images score "
         f"FID {about['floor']['fid']:.3f} against the same reference with the same features: "
         "what a perfect model would score at this sample count" if about["floor"] else
         "- floor: not measured (the other split has fewer images than the sample count)"), "",
        "| sampler | steps | guidance | FID | class accuracy | samples/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['fid']:.3f} | "
              f"{r['class_accuracy']:.3f} | {r['samples_per_s']:.1f} |" for r in rows]
    lines += ["", f"![FID and class accuracy vs steps]({png.name})", ""]
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
        # still leaves every finished point on disk.
        for sampler, steps in sorted(grid, key=lambda c: c[1]):
            for g in guidances:
                fc = dataclasses.replace(base, sampler=sampler, steps=steps, guidance=g)
                rows.append(evaluate(denoiser, diffusion, cfg, fc, args.seed, precision))
                if env.is_main:
                    r = rows[-1]
                    print(f"{sampler} {steps:4d} g={g:g}: FID {r['fid']:.3f}, class accuracy "
                          f"{r['class_accuracy']:.3f}, {r['samples_per_s']:.1f} samples/s",
                          flush=True)
                    rows.sort(key=lambda r: (grid.index((r["sampler"], r["steps"])),
                                             r["guidance"]))
                    plot(rows, png)
                    (out / "evaluation.md").write_text(report(rows, about, png))
        if env.is_main:
            print(f"wrote {out / 'evaluation.md'} and {png}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
