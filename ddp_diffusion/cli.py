"""The `ddp-diffusion` command: config, train, sample, fid, fid-ref, ema, export, submit,
sweep-status."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ddp_diffusion import submit_options
from ddp_diffusion.config import (
    DataConfig,
    check,
    check_at_least,
    check_features,
    check_fid,
    check_finite,
    check_sample,
    check_sigma_rel,
)
from ddp_diffusion.errors import EXIT_INTERRUPTED, DDPDiffusionError, UserError
from ddp_diffusion.registry import DATASETS, MODELS, SAMPLERS, Entry


def _train(args: argparse.Namespace) -> int:
    from ddp_diffusion import signals

    # Before torch is imported (seconds): under torchrun, a rank that fails its config check
    # first makes torchrun SIGTERM the others, which must then exit with their own error line.
    stop = signals.StopRequest()
    try:
        from ddp_diffusion import config

        cfg = config.load(args.config, args.overrides)  # torch-free: a bad setting fails fast
        from ddp_diffusion.train import dry_run, train

        return dry_run(cfg) if args.dry_run else train(cfg, stop)
    finally:
        signals.ignore_stop_signals()  # this process only exits from here on


def _submit(args: argparse.Namespace) -> int:
    from ddp_diffusion import config, slurm

    opts = submit_options.from_args(args)
    if opts.sweep:
        slurm.submit_sweep(args.config, args.overrides, opts)
        return 0
    check(opts.max_parallel == 0, "--max-parallel limits a --sweep's points; add --sweep "
                                  "KEY=V1,V2,... or drop it")
    slurm.submit(config.load(args.config, args.overrides), opts)
    return 0


def _sweep_status(args: argparse.Namespace) -> int:
    from ddp_diffusion import sweeps

    sys.stdout.write(sweeps.status_table(Path(args.folder)))
    return 0


SAMPLE_BATCH = 256  # sample --batch-size: a few GB at most for the default UNet on a CPU
SAMPLE_FLAGS = ("sampler", "steps", "guidance", "eta", "per_class")
FID_FLAGS = ("num_samples", "sampler", "steps", "guidance", "features", "reference",
             "batch_size")


def _check_flags(args: argparse.Namespace) -> None:
    """Ranges of the sampling flags that need no run (the rest is checked against its config)."""
    for flag, low in (("steps", 1), ("per_class", 1), ("num_samples", 2), ("batch_size", 1),
                      ("eta", 0)):
        if getattr(args, flag, None) is not None:
            check_at_least(f"--{flag.replace('_', '-')}", getattr(args, flag), low)
    if args.guidance is not None:
        check_finite("--guidance", args.guidance)
    _check_ema_weights(args)
    check((args.run is None) != (args.weights is None),
          "give --run RUN (a run directory) or --weights model.safetensors (written by "
          "ddp-diffusion export), one of them")
    if args.weights:
        given = [flag for flag, unset in (("--checkpoint", args.checkpoint is None),
                                          ("--ema-weights", args.ema_weights is None),
                                          ("--ema/--no-ema", args.ema is None))
                 if not unset]
        check(not given, f"{given[0] if given else ''} chooses weights from a run directory; "
                         "a --weights file holds one set (export another with ddp-diffusion "
                         "export --no-ema or --ema-weights)")


def _check_ema_weights(args: argparse.Namespace) -> None:
    """--ema-weights stands in for the EMA weights, so --no-ema contradicts it."""
    check(args.ema_weights is None or args.ema is not False,
          "--ema-weights replaces the EMA weights; drop --no-ema (or --ema-weights)")


def _overrides(args: argparse.Namespace, flags: tuple[str, ...]) -> dict[str, object]:
    """The flags that were given, by config key."""
    return {k: getattr(args, k) for k in flags if getattr(args, k) is not None}


def _load(args: argparse.Namespace, device: Any) -> Any:
    """The run the flags name, on `device`: a --weights file, or --run's checkpoint with the
    weights --ema/--no-ema/--ema-weights choose."""
    if args.weights:
        from ddp_diffusion import weights

        return weights.read(Path(args.weights), device)
    from ddp_diffusion.runs import load_run

    return load_run(Path(args.run), args.checkpoint and Path(args.checkpoint), args.ema, device,
                    args.ema_weights and Path(args.ema_weights))


def _sampling(args: argparse.Namespace, device: Any) -> tuple[Any, list[int], Any]:
    """The run (on `device`), the classes and the sample settings the sample flags ask for."""
    from ddp_diffusion.sample import parse_classes

    run = _load(args, device)
    classes = parse_classes(args.classes, run.class_names)
    s = dataclasses.replace(run.cfg.sample, **_overrides(args, SAMPLE_FLAGS))
    check_sample(s, run.diffusion.num_timesteps, prefix="--")
    return run, classes, s


def _sample(args: argparse.Namespace) -> int:
    from PIL import Image

    from ddp_diffusion.files import check_writable

    _check_flags(args)  # before torch is imported: a bad flag fails fast
    outputs = [flag for flag in ("out", "out_npz", "out_dir") if getattr(args, flag)]
    check(len(outputs) == 1, "sample writes one of: --out grid.png (a labelled grid), "
                             "--out-npz samples.npz or --out-dir folder (--num-samples images)")
    if outputs != ["out"]:
        return _sample_set(args)
    check(args.num_samples is None, "--num-samples is for --out-npz or --out-dir; a grid has "
                                    "--per-class images of each of --classes")
    out = Path(args.out)
    check(out.suffix.lower() in Image.registered_extensions(),
          f"--out {out}: name an image file, e.g. grid.png (PNG, JPEG, WebP, ...)")
    check_writable(out, "--out")
    import torch

    from ddp_diffusion.sample import check_grid, generate_grid

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run, classes, s = _sampling(args, device)
    m = run.cfg.model
    check_grid(len(classes), s.per_class, m.image_size, out)
    logging.getLogger("ddp_diffusion").info(
        "sampling %d images (%s, %d steps) from step %d", len(classes) * s.per_class, s.sampler,
        s.steps, run.step)
    grid = generate_grid(run.denoiser, run.diffusion, classes,
                         [run.class_names[c] for c in classes], s.per_class, s.sampler, s.steps,
                         s.guidance, seed=args.seed, eta=s.eta, precision=args.precision,
                         image_size=m.image_size, channels=m.in_channels,
                         chunk=args.batch_size)
    grid.save(out)
    print(f"wrote {out} ({len(classes)} classes x {s.per_class}, step {run.step})")
    return 0


def _sample_set(args: argparse.Namespace) -> int:
    import json

    from ddp_diffusion.files import check_writable

    out = Path(args.out_npz or args.out_dir)
    check(args.num_samples is not None, f"--out-{'npz' if args.out_npz else 'dir'} needs "
                                        "--num-samples N (50000 is FID's standard)")
    check(args.per_class is None, "--per-class is for grids (--out); an export has "
                                  "--num-samples images, cycling through --classes")
    check(not args.out_npz or out.suffix == ".npz", f"--out-npz {out}: name a .npz file")
    check(not args.out_dir or out.suffix != ".npz", f"--out-dir {out}: name a folder (for a "
                                                    ".npz file use --out-npz)")
    from ddp_diffusion import distributed
    from ddp_diffusion.export import export
    from ddp_diffusion.sample import SampleSet

    env = distributed.init()
    try:
        if args.out_npz:  # only rank 0 writes it
            distributed.run_on_main(env.is_main, lambda: check_writable(out, "--out-npz"))
        run, classes, s = _sampling(args, env.device)
        samples = SampleSet(args.num_samples, args.batch_size, tuple(classes), s.sampler, s.steps,
                            s.guidance, s.eta, args.seed, args.precision)
        identity = ({"weights": str(Path(args.weights).resolve()), "step": run.step}
                    if args.weights else
                    {"run": str(Path(args.run).resolve()), "step": run.step,
                     "ema": run.cfg.sample.use_ema if args.ema is None else args.ema})
        if args.ema_weights:
            identity["ema_weights"] = str(Path(args.ema_weights).resolve())
        m = run.cfg.model
        result = export(run.denoiser, run.diffusion, samples, m.image_size, m.in_channels, out,
                        identity, env)
        if env.is_main:
            print(json.dumps(result, indent=2))
        return 0
    finally:
        distributed.shutdown()


def _fid(args: argparse.Namespace) -> int:
    import json

    _check_flags(args)  # before torch is imported: a bad flag fails fast
    from ddp_diffusion import distributed
    from ddp_diffusion.fid import evaluate, local_paths
    from ddp_diffusion.files import check_writable, write_atomic

    env = distributed.init()
    try:
        if args.out:  # only rank 0 writes it
            distributed.run_on_main(env.is_main, lambda: check_writable(Path(args.out), "--out"))
        if args.run and args.ema is None:
            args.ema = True  # fid scores the EMA weights unless told otherwise
        run = _load(args, env.device)
        fc = dataclasses.replace(run.cfg.fid, inception_weights=args.inception_weights,
                                 ref_stats=args.ref_stats, **_overrides(args, FID_FLAGS))
        check_fid(fc, run.diffusion.num_timesteps, prefix="--")
        cfg = local_paths(run.cfg, args.data_root, args.data_path, args.inception_weights,
                          args.ref_stats)
        if args.eta is not None:
            cfg.sample.eta = args.eta
        result = {**({"weights": args.weights} if args.weights else
                     {"run": args.run, "checkpoint": args.checkpoint}), "step": run.step,
                  **({"ema_weights": args.ema_weights} if args.ema_weights else {}),
                  **evaluate(run.denoiser, run.diffusion, cfg, fc, args.seed, args.precision)}
        if env.is_main:
            text = json.dumps(result, indent=2)
            print(text)
            if args.out:
                write_atomic(Path(args.out), lambda f: f.write(f"{text}\n".encode()))
        return 0
    finally:
        distributed.shutdown()


def _export_weights(args: argparse.Namespace) -> int:
    import json

    from ddp_diffusion.files import check_writable

    out = Path(args.out)
    check(out.suffix == ".safetensors", f"--out {out}: name a .safetensors file")
    _check_ema_weights(args)
    check_writable(out, "--out")
    import torch

    from ddp_diffusion import weights
    from ddp_diffusion.runs import load_run

    run = load_run(Path(args.run), args.checkpoint and Path(args.checkpoint), args.ema,
                   torch.device("cpu"), args.ema_weights and Path(args.ema_weights))
    source = ({"weights": "ema_weights", "file": Path(args.ema_weights).name}
              if args.ema_weights else {"weights": "ema" if args.ema else "raw"})
    print(json.dumps(weights.write(run, source, out)))
    return 0


def _config(args: argparse.Namespace) -> int:
    from ddp_diffusion import config, config_docs

    sys.stdout.write(config_docs.RENDER[args.format](config.load(args.config, args.overrides)))
    return 0


def _fid_ref(args: argparse.Namespace) -> int:
    from ddp_diffusion import config
    from ddp_diffusion.files import check_writable

    cfg = config.load(args.config, args.overrides)
    out = Path(args.out)
    check(out.suffix == ".npz", f"--out {out}: name an .npz file")
    check_features(cfg, cfg.fid.features, "fid.features")
    check_writable(out, "--out")
    from ddp_diffusion.fid import reference_file

    print(reference_file(cfg, out))
    return 0


def _parse_sigma_rels(args: argparse.Namespace) -> list[float]:
    """The lengths asked for: --sigma-rel S, or each of --sweep S1,S2,... (checked)."""
    check((args.sigma_rel is None) != (args.sweep is None),
          "ema makes --sigma-rel S (one file, --out weights.pt) or --sweep S1,S2,... (one file "
          "each, in the folder --out); give one of them")
    if args.sigma_rel is not None:
        check_sigma_rel("--sigma-rel", args.sigma_rel)
        return [args.sigma_rel]
    try:
        values = [float(v) for v in args.sweep.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--sweep {args.sweep}: list numbers separated by commas, e.g. "
                        "0.03,0.05,0.08") from None
    check(len(values) > 0, "--sweep: list one or more lengths, e.g. 0.03,0.05,0.08")
    for value in values:
        check_sigma_rel("--sweep", value)
    return values


def sweep_name(sigma_rel: float, step: int) -> str:
    """The file `ema --sweep` writes for one length."""
    return f"ema-sigma{sigma_rel:g}-step{step:08d}.pt"


def _ema(args: argparse.Namespace) -> int:
    import json

    from ddp_diffusion.files import check_writable

    sigma_rels = _parse_sigma_rels(args)  # before torch is imported: a bad flag fails fast
    if args.step is not None:
        check_at_least("--step", args.step, 1)
    out = Path(args.out)
    if args.sweep is None:
        check(out.suffix == ".pt", f"--out {out}: name a .pt file (with --sweep: a folder)")
        check_writable(out, "--out")
    else:
        check(out.suffix != ".pt", f"--out {out}: with --sweep, name a folder (one file a "
                                   "length goes there)")
        check_writable(out / sweep_name(sigma_rels[0], 0), "--out")
    import torch

    from ddp_diffusion.files import write_atomic
    from ddp_diffusion.runs import posthoc_ema, posthoc_snapshots

    snapshots = posthoc_snapshots(Path(args.run), args.step)
    step = snapshots[-1].step
    for sigma_rel in sigma_rels:
        weights, info = posthoc_ema(snapshots, sigma_rel, step)
        path = out if args.sweep is None else out / sweep_name(sigma_rel, step)
        write_atomic(path, lambda f, w=weights: torch.save(w, f))
        info.pop("coefficients")
        print(json.dumps({"out": str(path), **info}))
    return 0


def registered_choices() -> str:
    """train --help's list of the registered models, datasets and samplers, with their docs."""
    tables: tuple[tuple[str, dict[str, Entry]], ...] = (
        ("model.name", MODELS), ("data.dataset", DATASETS),
        ("sample.sampler and fid.sampler (the --sampler of sample and fid)", SAMPLERS))
    width = max(len(name) for _, table in tables for name in table)
    return "\n".join(f"{key}:\n" + "\n".join(f"  {name:<{width}}  {entry.doc}"
                                             for name, entry in table.items())
                     for key, table in tables)


def _config_arguments(p: argparse.ArgumentParser) -> None:
    """--config and the dotted overrides, as train reads them."""
    p.add_argument("--config", help="YAML config (defaults when omitted)")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddp-diffusion",
        description="Train and sample class-conditional diffusion models (DDP, torchrun, SLURM).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (single process, or under torchrun)",
                       description="Train. Overrides are dotted keys: train.lr=2e-4 out_dir=runs/x"
                                   " (`ddp-diffusion config` lists every key: type, default, "
                                   "what it does, what happens to it on resume).",
                       epilog=registered_choices(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_arguments(p)
    p.add_argument("--dry-run", action="store_true",
                   help="check everything train checks before it changes anything (under "
                        "torchrun too) and print what it would do: the config's changes, batch "
                        "per rank, parameters, GFLOP, memory, the data, the checkpoint it would "
                        "resume and what it would move aside, the W&B run; writes nothing")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "config", help="every config key: its value, type, default, meaning and resume policy",
        description="Every config key with its value (the defaults, or --config and "
                    "overrides, checked as train checks them), type, default, a line on what it "
                    "does and what happens to it on resume. --format yaml writes a complete, "
                    "commented config that train --config reads unchanged; markdown, the "
                    "README's table.")
    _config_arguments(p)
    p.add_argument("--format", choices=("text", "yaml", "markdown"), default="text")
    p.set_defaults(func=_config)

    p = sub.add_parser(
        "sample", help="a labelled grid of generated images, or N images as .npz or PNGs",
        description="--out: a labelled grid. --out-npz / --out-dir: --num-samples images for "
                    "evaluation suites (arr_0 uint8 NHWC + arr_1 labels, as the ADM suite "
                    "reads; or PNGs + EDM's dataset.json), on every rank under torchrun, the "
                    "same set for any world size, resumable; with fid's settings (--sampler, "
                    "--steps, --guidance, --batch-size, --seed) the very images fid scores.")
    p.add_argument("--run", "--run-dir", dest="run",
                   help="run directory (its out_dir); --run-dir under torchrun")
    p.add_argument("--weights", metavar="FILE.safetensors",
                   help="weights written by ddp-diffusion export, instead of --run")
    p.add_argument("--checkpoint", help="checkpoint file (default: newest in RUN/checkpoints)")
    p.add_argument("--classes", default="all",
                   help="'all' or names/indices, e.g. sneaker,bag or 7,8 (default: all)")
    p.add_argument("--per-class", type=int, help="images per class (default: config)")
    p.add_argument("--sampler", choices=list(SAMPLERS), help="default: config")
    p.add_argument("--steps", type=int, help="sampling steps (default: config)")
    p.add_argument("--guidance", type=float, help="CFG scale g: (1+g)*cond - g*uncond")
    p.add_argument("--eta", type=float, help="DDIM eta (default: config)")
    p.add_argument("--batch-size", type=int, default=SAMPLE_BATCH,
                   help="images generated at once (memory); a grid of up to this many is one "
                        "batch, as before chunking, and larger ones differ by this size "
                        f"(default: {SAMPLE_BATCH})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction,
                   help="EMA weights (--no-ema: the raw ones; default: config sample.use_ema)")
    p.add_argument("--ema-weights", metavar="FILE",
                   help="use these weights (written by `ddp-diffusion ema`) instead of the "
                        "checkpoint's EMA")
    p.add_argument("--out", help="the grid's image path (PNG, JPEG, ...)")
    p.add_argument("--num-samples", type=int, help="images to export (--out-npz, --out-dir)")
    p.add_argument("--out-npz", help="export to this .npz (arr_0: uint8 N x H x W x C, "
                                     "arr_1: labels)")
    p.add_argument("--out-dir", help="export to this folder: 000000.png, ... and dataset.json")
    p.set_defaults(func=_sample)

    p = sub.add_parser(
        "fid", help="FID and class accuracy of generated images (single process or torchrun)",
        description="FID against the real statistics of the run's data (cached). Defaults: "
                    "the run's fid.* config, except --num-samples 10000 and every path (see "
                    "--data-root).")
    # torchrun's own parser rejects a later '--run' (ambiguous with its --run-path): use
    # --run-dir under torchrun.
    p.add_argument("--run", "--run-dir", dest="run",
                   help="run directory (its out_dir); --run-dir under torchrun")
    p.add_argument("--weights", metavar="FILE.safetensors",
                   help="weights written by ddp-diffusion export, instead of --run")
    p.add_argument("--checkpoint", help="checkpoint file (default: newest in RUN/checkpoints)")
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--sampler", choices=list(SAMPLERS))
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--guidance", type=float, help="CFG scale g: (1+g)*cond - g*uncond")
    p.add_argument("--eta", type=float, help="DDIM eta (default: config sample.eta)")
    p.add_argument("--features", choices=("fashion", "inception"))
    p.add_argument("--reference", choices=("train", "test"), help="real split")
    p.add_argument("--ref-stats", "--ref", dest="ref_stats", metavar="STATS.npz",
                   help="real statistics (mu, sigma) to compare with instead of the split's: "
                        "published ones, or written by fid-ref")
    p.add_argument("--inception-weights",
                   help="local weights-inception-2015-12-05-6726825d.pth (default: the torch "
                        "hub cache; the checkpoint's fid.inception_weights is not used)")
    p.add_argument("--data-root", default=DataConfig.root,
                   help="data folder: the datasets, and the reference statistics cached in "
                        "DATA_ROOT/fid_reference (default: %(default)s; the checkpoint's "
                        "data.root is not used: a checkpoint never chooses the files fid reads "
                        "or writes)")
    p.add_argument("--data-path",
                   help="an image_folder run's images (needed for those; the checkpoint's "
                        "data.path is not used)")
    p.add_argument("--batch-size", type=int, help="images per generation chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction,
                   help="EMA weights (the default; --no-ema: the raw ones)")
    p.add_argument("--ema-weights", metavar="FILE",
                   help="use these weights (written by `ddp-diffusion ema`) instead of the "
                        "checkpoint's EMA")
    p.add_argument("--out", help="also write the JSON result here")
    p.set_defaults(func=_fid)

    p = sub.add_parser(
        "export", help="a run's weights as one .safetensors file to hand over",
        description="The network's weights (EMA by default; --no-ema: the raw ones; "
                    "--ema-weights: a post-hoc EMA) as safetensors: tensors only, no optimizer "
                    "or progress, with the model, diffusion, data, sample and fid settings and "
                    "the class names as metadata (no local paths). sample and fid take it with "
                    "--weights, without the run directory.")
    p.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory")
    p.add_argument("--checkpoint", help="checkpoint file (default: newest in RUN/checkpoints)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="EMA weights (default; --no-ema: the raw ones)")
    p.add_argument("--ema-weights", metavar="FILE",
                   help="these weights (written by `ddp-diffusion ema`) instead of the "
                        "checkpoint's EMA")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.set_defaults(func=_export_weights)

    p = sub.add_parser(
        "fid-ref", help="write the real statistics fid compares with as an .npz (mu, sigma)",
        description="The real images' statistics (mu, sigma, num_samples), in the layout of "
                    "pytorch-fid and the ADM suite, for `fid --ref-stats`: the data, split "
                    "(fid.reference), features (fid.features, fid.inception_weights) and size "
                    "(model.image_size) from --config and overrides, e.g. "
                    "fid.features=inception fid.reference=test")
    _config_arguments(p)
    p.add_argument("--out", required=True, help="the .npz to write")
    p.set_defaults(func=_fid_ref)

    p = sub.add_parser(
        "ema", help="an EMA of any length, made after training from post-hoc snapshots",
        description="EDM2's post-hoc EMA: the power-function EMA of relative length --sigma-rel "
                    "(std of its averaging profile / training steps) at --step, as the least-"
                    "squares combination of the snapshots a run with train.ema_posthoc=true "
                    "wrote to RUN/posthoc/. Writes a state dict like the checkpoint's EMA, for "
                    "sample and fid --ema-weights; prints how it was made (one JSON line each).")
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run directory (its out_dir)")
    p.add_argument("--sigma-rel", type=float, help="the length, e.g. 0.08 (in (0, 0.2887])")
    p.add_argument("--sweep", metavar="S1,S2,...",
                   help="several lengths, one file each in the folder --out")
    p.add_argument("--step", type=int,
                   help="a step with a snapshot (default: the newest); snapshots up to it are used")
    p.add_argument("--out", required=True, help="weights.pt (with --sweep: a folder)")
    p.set_defaults(func=_ema)

    p = sub.add_parser(
        "submit", help="submit training to SLURM through submitit (requeues on preemption)",
        description="Submit training to SLURM. Config and overrides as for `train`. With "
                    "--sweep KEY=V1,V2 (repeatable): one job array of every combination, point "
                    "P in OUT_DIR/P (named from its overrides), W&B group OUT_DIR's name.")
    _config_arguments(p)
    submit_options.add_arguments(p)
    p.set_defaults(func=_submit)

    p = sub.add_parser(
        "sweep-status", help="each point of a submit --sweep: step, last loss, last FID",
        description="Reads FOLDER/sweep.yaml and each point's metrics.jsonl.")
    p.add_argument("folder", help="the sweep's out_dir")
    p.set_defaults(func=_sweep_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except DDPDiffusionError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: ranks' lines never interleave
        sys.stderr.flush()
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted (Ctrl-C); nothing more was saved. In training, a "
                         "single Ctrl-C saves a checkpoint first, and the same command resumes\n")
        return EXIT_INTERRUPTED
