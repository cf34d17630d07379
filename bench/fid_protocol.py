"""How far to trust an FID: the metrics against the EMA length chosen after training, and the
estimate's spread against the sample count.

    python bench/fid_protocol.py ema --run R          # a run trained with train.ema_posthoc
    python bench/fid_protocol.py stability --run R    # 1k/2k/5k/10k samples x 3 seeds
    python bench/fid_protocol.py ema --run R --quick --out-dir /tmp/q   # a smoke run

`ema` reconstructs the EMA of each --sigma-rels length from the run's post-hoc snapshots
(`ddp-diffusion ema`'s code) and scores each, beside the checkpoint's half-life EMA and its raw
weights, on the same sample set (one seed: the differences are the weights', not the noise's).
`stability` draws max(--counts) images per seed once and scores every prefix: chunk c is seeded
by its index, so the first n images of a seed are the set `fid --num-samples n` draws; next to
each count, the floor (the first n real images of the other split against the same reference).
Each writes OUT_DIR/fid_<part>.json and .md after every point, so a stopped run keeps what it
finished. One process (the CPU's threads, or one GPU)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ddp_diffusion import fid
from ddp_diffusion.config import Config, FidConfig
from ddp_diffusion.errors import UserError
from ddp_diffusion.precision import resolve_precision
from ddp_diffusion.runs import Run, load_run, posthoc_ema, posthoc_snapshots
from ddp_diffusion.sample import SampleSet
from ddp_diffusion.seeds import derive_seed

SIGMA_RELS = [0.02, 0.035, 0.05, 0.07, 0.10, 0.15, 0.2]
COUNTS = [1000, 2000, 5000, 10000]
QUICK = {"sigma_rels": [0.05, 0.1], "counts": [40, 80], "seeds": 2, "num_samples": 40,
         "steps": 3}


def device_name(device: torch.device) -> str:
    """The chip, in words, with the CPU's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "avx512_bf16" if "avx512_bf16" in flags else "avx2" if "avx2" in flags else "other"
    return f"CPU {platform.machine()} ({isa}), {torch.get_num_threads()} threads"


def write(out_dir: Path, part: str, about: dict[str, Any], rows: list[dict[str, Any]],
          table: list[str]) -> None:
    """OUT_DIR/fid_<part>.json (everything) and .md (what was measured on what, then the
    table), rewritten after every point."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"fid_{part}.json").write_text(json.dumps({"about": about, "rows": rows},
                                                         indent=1) + "\n")
    head = [f"Written by `bench/fid_protocol.py {part}` on {about['date']} ({about['device']}, "
            f"sampling in {about['precision']}{', **quick mode**' if about['quick'] else ''}).",
            "", f"- model: run `{about['run']}`, step {about['step']} "
            f"({about['images']:,} training images)",
            f"- samples: {about['sampler']} {about['steps']} steps, guidance {about['guidance']:g},"
            f" chunks of {about['batch_size']}; `{about['features']}` features against the "
            f"{about['reference_samples']:,} real {about['reference']} images", ""]
    (out_dir / f"fid_{part}.md").write_text("\n".join(head + table) + "\n")


def describe(args: argparse.Namespace, run: Run, fc: FidConfig, precision: str,
             device: torch.device) -> dict[str, Any]:
    """The settings every row shares."""
    return {"run": args.run, "step": run.step, "images": run.step * run.cfg.train.batch_size,
            "date": datetime.date.today().isoformat(), "device": device_name(device),
            "precision": precision, "quick": args.quick, "sampler": fc.sampler,
            "steps": fc.steps, "guidance": fc.guidance, "batch_size": fc.batch_size,
            "features": fc.features, "reference": fc.reference}


def ema_lengths(args: argparse.Namespace, cfg: Config, fc: FidConfig, device: torch.device,
                precision: str) -> None:
    """Metrics of each reconstructed length, the half-life EMA and the raw weights, one seed."""
    run = load_run(Path(args.run), None, True, device)
    raw = load_run(Path(args.run), None, False, device).denoiser.state_dict()
    half_life = {k: v.clone() for k, v in run.denoiser.state_dict().items()}
    snapshots = posthoc_snapshots(Path(args.run), None)
    about = describe(args, run, fc, precision, device) | {
        "seed": args.seed, "num_samples": fc.num_samples, "snapshots": [s.step for s in
                                                                        snapshots],
        "tracked": snapshots[-1].sigma_rels,
        "ema_halflife_kimg": cfg.train.ema_halflife_kimg}
    points: list[tuple[str, dict[str, torch.Tensor], dict[str, Any]]] = [
        ("half-life EMA", half_life, {}), ("raw weights", raw, {})]
    for sigma_rel in args.sigma_rels:
        weights, info = posthoc_ema(snapshots, sigma_rel, run.step)
        points.append((f"sigma_rel {sigma_rel:g}", weights, {"sigma_rel": sigma_rel,
                                                              "profile_error":
                                                                  info["profile_error"]}))
    rows: list[dict[str, Any]] = []
    for name, weights, extra in points:
        run.denoiser.load_state_dict(weights)
        r = fid.evaluate(run.denoiser, run.diffusion, cfg, fc, args.seed, precision)
        rows.append({"weights": name, **extra, **{k: r.get(k) for k in (
            *fid.METRICS, "samples_per_s", "samples_sha256")}})
        about["reference_samples"] = r["reference_samples"]
        print(json.dumps(rows[-1]), flush=True)
        table = ["| weights | profile error | FID | KID x 1e3 (sd) | precision | recall | "
                 "class accuracy |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        table += [f"| {x['weights']} | {x.get('profile_error', float('nan')):.4f} | "
                  f"{x['fid']:.3f} | {1e3 * x['kid']:.2f} ({1e3 * x['kid_std']:.2f}) | "
                  f"{x['precision']:.3f} | {x['recall']:.3f} | "
                  f"{x.get('class_accuracy') or float('nan'):.3f} |" for x in rows]
        write(Path(args.out_dir), "ema", about, rows, table)


def prefix_fid(metric: fid.FrechetInceptionDistance, features: torch.Tensor) -> float:
    """FID of the generated features given, against the reference already in `metric`: the
    sums torchmetrics' update() would have accumulated, then its own compute()."""
    f = features.double().to(metric.device)
    metric.reset()  # the generated sums (and the cached result); the reference stays
    metric.fake_features_sum = f.sum(0)
    metric.fake_features_cov_sum = f.T @ f
    metric.fake_features_num_samples = torch.tensor(len(f), device=metric.device)
    return float(metric.compute())


def mean_sd(xs: list[float]) -> str:
    """'mean ± sd' (the mean alone for one value)."""
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1
                                            else "")


def stability(args: argparse.Namespace, cfg: Config, fc: FidConfig, device: torch.device,
              precision: str) -> None:
    """FID and KID of the first n images of each seed's set, and the floor at each n."""
    run = load_run(Path(args.run), None, True, device)
    extractor = fid.build_extractor(fc.features, fc.inception_weights).to(device)
    metric = fid.new_metric(extractor, sync=False)
    ref = fid.load_reference(extractor, cfg, fc)
    fid.set_reference(metric, ref.states)
    other = "test" if fc.reference == "train" else "train"
    about = describe(args, run, fc, precision, device) | {
        "counts": args.counts, "seeds": list(range(args.seed, args.seed + args.seeds)),
        "reference_samples": ref.num_samples, "floor_split": other}
    floors: dict[int, float | None] = {}
    for n in args.counts:
        try:
            floors[n] = fid.real_fid(cfg, dataclasses.replace(fc, num_samples=n), other)["fid"]
        except UserError:  # the other split is smaller than n
            floors[n] = None
    rows: list[dict[str, Any]] = []
    for seed in about["seeds"]:
        samples = SampleSet(max(args.counts), fc.batch_size, tuple(range(cfg.model.num_classes)),
                            fc.sampler, fc.steps, fc.guidance, cfg.sample.eta, seed, precision)
        t0 = time.perf_counter()
        generated = torch.cat([features for *_, features in fid.generated_features(
            run.denoiser, run.diffusion, cfg, samples, range(samples.num_chunks), extractor,
            extractor)])
        for n in args.counts:
            rows.append({"seed": seed, "num_samples": n,
                         "fid": prefix_fid(metric, generated[:n]),
                         **fid.kid_and_precision_recall(generated[:n],
                                                        ref.states[fid.REAL_FEATURES],
                                                        derive_seed(seed, "kid")),
                         "samples_per_s": max(args.counts) / (time.perf_counter() - t0)})
            print(json.dumps(rows[-1]), flush=True)
        table = ["| samples | FID mean ± sd | FID by seed | KID x 1e3 mean ± sd | floor (real "
                 f"{other} images) |", "| ---: | ---: | --- | ---: | ---: |"]
        for n in args.counts:
            at = [r for r in rows if r["num_samples"] == n]
            fids, kids = [r["fid"] for r in at], [1e3 * r["kid"] for r in at]
            table.append(f"| {n:,} | {mean_sd(fids)} | "
                         f"{', '.join(f'{x:.3f}' for x in fids)} | {mean_sd(kids)} | "
                         f"{'n/a' if floors[n] is None else f'{floors[n]:.3f}'} |")
        write(Path(args.out_dir), "stability", about | {"floors": floors}, rows, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("ema", "stability"))
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--data-root", help="where the real images are (default: the run's)")
    parser.add_argument("--sigma-rels", type=lambda s: [float(x) for x in s.split(",")],
                        default=SIGMA_RELS, help="ema: the lengths to reconstruct")
    parser.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")],
                        default=COUNTS, help="stability: the sample counts")
    parser.add_argument("--seeds", type=int, default=3, help="stability: seeds seed, seed+1, ..")
    parser.add_argument("--num-samples", type=int, default=2000, help="ema: images per point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", help="default: the run's fid.sampler")
    parser.add_argument("--steps", type=int, help="default: the run's fid.steps")
    parser.add_argument("--guidance", type=float, help="default: the run's fid.guidance")
    parser.add_argument("--batch-size", type=int, default=250, help="images per chunk")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--quick", action="store_true", help=f"smoke settings {QUICK}")
    parser.add_argument("--out-dir", default="docs")
    args = parser.parse_args()
    if args.quick:
        args.sigma_rels, args.counts, args.seeds = (QUICK["sigma_rels"], QUICK["counts"],
                                                    QUICK["seeds"])
        args.num_samples, args.steps = QUICK["num_samples"], QUICK["steps"]
        args.batch_size = 20

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_run(Path(args.run), None, True, torch.device("cpu")).cfg
    cfg.data.root = args.data_root or cfg.data.root
    fc = dataclasses.replace(cfg.fid, num_samples=args.num_samples, batch_size=args.batch_size,
                             **{k: getattr(args, k) for k in ("sampler", "steps", "guidance")
                                if getattr(args, k) is not None})
    precision = resolve_precision(args.precision, device)
    (ema_lengths if args.part == "ema" else stability)(args, cfg, fc, device, precision)


if __name__ == "__main__":
    main()
