"""The `ddp-diffusion` command: train, sample."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ddp_diffusion.config import UserError
from ddp_diffusion.train import TrainingDiverged

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


def _train(args: argparse.Namespace) -> int:
    from ddp_diffusion import config
    from ddp_diffusion.train import train

    return train(config.load(args.config, args.overrides))


def _sample(args: argparse.Namespace) -> int:
    import torch

    from ddp_diffusion.sample import generate, load_run, parse_classes, save_grid

    classes = parse_classes(args.classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, denoiser, diffusion, step = load_run(Path(args.run), args.checkpoint and
                                              Path(args.checkpoint), not args.no_ema, device)
    s = cfg.sample
    per_class = args.per_class or s.per_class
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class)
    images = generate(denoiser, diffusion, labels, args.sampler or s.sampler,
                      args.steps or s.steps, s.guidance if args.guidance is None else args.guidance,
                      seed=args.seed, eta=s.eta if args.eta is None else args.eta,
                      precision=args.precision, image_size=cfg.model.image_size)
    out = save_grid(images, classes, per_class, Path(args.out))
    print(f"wrote {out} ({len(classes)} classes x {per_class}, step {step})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddp-diffusion",
        description="Train and sample class-conditional diffusion models (DDP, torchrun, SLURM).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (single process, or under torchrun)",
                       description="Train. Overrides are dotted keys: train.lr=2e-4 out_dir=runs/x")
    p.add_argument("--config", help="YAML config (defaults when omitted)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="write a labelled PNG grid of generated images")
    p.add_argument("--run", required=True, help="run directory (its out_dir)")
    p.add_argument("--checkpoint", help="checkpoint file (default: newest in RUN/checkpoints)")
    p.add_argument("--classes", default="all",
                   help="'all' or names/indices, e.g. sneaker,bag or 7,8 (default: all)")
    p.add_argument("--per-class", type=int, default=0, help="images per class (default: config)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), help="default: config")
    p.add_argument("--steps", type=int, default=0, help="sampling steps (default: config)")
    p.add_argument("--guidance", type=float, help="CFG scale g: (1+g)*cond - g*uncond")
    p.add_argument("--eta", type=float, help="DDIM eta (default: config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--out", required=True, help="output PNG path")
    p.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
