"""BASELINE, not part of ddp-diffusion: the code-along's training loop, re-implemented faithfully.

Everything our benchmarks compare against lives here, written the way the "diffuser from
scratch" code-along writes it: torchvision's FashionMNIST with per-sample PIL ``Resize(32)``,
``ToTensor`` and per-sample noising (torchmultimodal's ``RandomDiffusionSteps(batched=False)``)
inside a 2-worker ``DataLoader`` (batch 192, shuffled, pinned memory), its U-Net (our
``SeedUNet`` is that network layer for layer) wrapped in ``CFGuidance`` (label dropout 0.1) and
``DDPModule``, a separate ``nn.Embedding`` class encoder, AdamW at 1e-4 over both, the hybrid
loss, fp32, and ``loss.item()`` every step for the progress bar.

    python bench/codealong.py --data-root /tmp/data --steps 5 --json out.json     # step times
    python bench/codealong.py --data-root /tmp/data --time-budget 600 --save runs/ref

``--save`` writes a run directory in ddp-diffusion's checkpoint format (weights only, as the
code-along keeps no EMA), so ``ddp-diffusion fid --run`` evaluates it like any of our runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmultimodal.diffusion_labs.modules.adapters.cfguidance import CFGuidance
from torchmultimodal.diffusion_labs.modules.losses.diffusion_hybrid_loss import (
    DiffusionHybridLoss,
)
from torchmultimodal.diffusion_labs.predictors.noise_predictor import NoisePredictor
from torchmultimodal.diffusion_labs.samplers.ddpm import DDPModule
from torchmultimodal.diffusion_labs.schedules.discrete_gaussian_schedule import (
    DiscreteGaussianSchedule,
    linear_beta_schedule,
)
from torchmultimodal.diffusion_labs.transforms.diffusion_transform import RandomDiffusionSteps
from torchmultimodal.diffusion_labs.utils.common import DiffusionOutput
from torchvision.datasets import FashionMNIST
from torchvision.transforms import Compose, Lambda, Resize, ToTensor

from ddp_diffusion import checkpoint, config, rundir
from ddp_diffusion.model import SeedUNet
from ddp_diffusion.sources import prepare

SEED_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "seed.yaml"


class CodeAlongUNet(SeedUNet):
    """SeedUNet returning torchmultimodal's DiffusionOutput, as the code-along's network does:
    DDPModule refuses any other type in training (ours returns network.NetworkOutput)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor]
                ) -> DiffusionOutput:
        out = super().forward(x, t, c)
        return DiffusionOutput(prediction=out.prediction, variance_value=out.variance_value)


class CodeAlong:
    """The code-along's data pipeline, model, optimizer and loss, ready to take steps."""

    def __init__(self, data_root: str, device: torch.device, batch_size: int = 192,
                 num_workers: int = 2) -> None:
        self.device = device
        self.schedule = DiscreteGaussianSchedule(linear_beta_schedule(1000))
        predictor = NoisePredictor(self.schedule, lambda x: torch.clamp(x, -1, 1))
        unet = CFGuidance(CodeAlongUNet(), {"context": 32}, guidance=2.0)
        eval_steps = torch.linspace(0, 999, 250, dtype=torch.long)
        self.model = DDPModule(unet, self.schedule, predictor, eval_steps).to(device)
        self.encoder = nn.Embedding(10, 32).to(device)
        noising = RandomDiffusionSteps(self.schedule, batched=False)
        transform = Compose([Resize(32), ToTensor(), Lambda(lambda x: 2 * x - 1),
                             Lambda(lambda x: noising({"x": x}))])
        dataset = FashionMNIST(data_root, train=True, download=False, transform=transform)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                 num_workers=num_workers, pin_memory=device.type == "cuda")
        self.optimizer = torch.optim.AdamW(
            [{"params": self.encoder.parameters()}, {"params": self.model.parameters()}],
            lr=0.0001)
        self.h_loss = DiffusionHybridLoss(self.schedule)
        self.batches = iter(self.loader)
        self.epoch = 0

    def next_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The next batch; a new epoch re-creates the workers, as a plain DataLoader does."""
        try:
            return next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> float:
        """One training step of the code-along's loop; returns the loss (a host sync)."""
        x, c = self.next_batch()
        d = self.device
        x0, xt, noise, t, c = (x["x"].to(d), x["xt"].to(d), x["noise"].to(d), x["t"].to(d),
                               c.to(d))
        self.optimizer.zero_grad()
        embedding = self.encoder(c)
        out = self.model(xt, t, {"context": embedding})
        loss = self.h_loss(out.prediction, noise, out.mean, out.log_variance, x0, xt, t)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def denoiser_state(self) -> dict[str, torch.Tensor]:
        """The weights under ddp-diffusion's ConditionalDenoiser names (encoder + CFGuidance)."""
        state = {"class_embedding.weight": self.encoder.weight.detach().cpu()}
        for k, v in self.model.model.state_dict().items():  # DDPModule.model is the CFGuidance
            state[f"cfguidance.{k}"] = v.detach().cpu()
        return state

    def save_run(self, run_dir: Path, step: int) -> Path:
        """A run directory that `ddp-diffusion sample/fid --run` can load (weights, no EMA)."""
        cfg = config.load(SEED_CONFIG, [f"out_dir={run_dir}"])
        cfg.model = config.with_data_shape(cfg.model, num_classes=10, channels=1)  # Fashion
        weights = self.denoiser_state()
        return checkpoint.write_atomic({
            "step": step, "images_seen": step * self.loader.batch_size,
            "model": weights, "ema": weights, "config": config.to_dict(cfg),
            "note": "code-along baseline (bench/codealong.py): no EMA, 'ema' holds the weights",
        }, checkpoint.path_for(run_dir / rundir.CHECKPOINTS, step))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=192)
    p.add_argument("--steps", type=int, default=0, help="time this many steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--time-budget", type=float, default=0.0, help="train for this many seconds")
    p.add_argument("--save", type=Path, help="write a run directory here at the end")
    p.add_argument("--json", type=Path, help="write step times and peak RSS here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    prepare(args.data_root, config.DataConfig().debian_dir, download=False)
    run = CodeAlong(args.data_root, torch.device(args.device), args.batch_size)
    warmup = args.warmup if args.steps else 0  # a time budget counts every step
    for _ in range(warmup):
        run.step()
    times, losses, start = [], [], time.perf_counter()
    while (len(times) < args.steps if args.steps
           else time.perf_counter() - start < args.time_budget):
        t0 = time.perf_counter()
        losses.append(run.step())
        times.append(time.perf_counter() - t0)
    result: dict[str, Any] = {
        "step_s": times, "loss": losses, "batch_size": args.batch_size, "device": args.device,
        "steps": len(times), "wall_s": time.perf_counter() - start, "epochs": run.epoch,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.save:
        result["checkpoint"] = str(run.save_run(args.save, warmup + len(times)))
    text = json.dumps(result)
    if args.json:
        args.json.write_text(text)
    print(text if len(text) < 2000 else json.dumps({k: v for k, v in result.items()
                                                     if k not in ("step_s", "loss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
