"""Training: `_train` is the control loop, read top to bottom; `train_step` computes one step.

Exact resumption: every random draw of step s (data order, timesteps, noise, label dropout, the
model's dropout masks) is a pure function of (seed, s) and the sample's index in the global
batch, the learning rate is a function of s, and a checkpoint holds everything else that changes
(weights, EMA, optimizer moments, loss scale, progress). So a run resumed from step k continues
bitwise identically to one that never stopped, and on another world size identically up to
floating-point reduction order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ddp_diffusion import checkpoint, config, distributed, files, rundir, signals
from ddp_diffusion.checkpoint import CheckpointManager, Part, ResumePlan
from ddp_diffusion.config import Config, TrainConfig, check_batch
from ddp_diffusion.data import Batch, check_fits, make_loader
from ddp_diffusion.diffusion import Diffusion, build_denoiser
from ddp_diffusion.distributed import DistEnv
from ddp_diffusion.ema import EMA, ema_beta
from ddp_diffusion.errors import (
    EXIT_OK,
    EXIT_PREEMPTED,
    CheckpointError,
    TrainingDiverged,
    UserError,
    WriteFailed,
)
from ddp_diffusion.model import activation_bytes, count_parameters, forward_gflops
from ddp_diffusion.nonfinite import NonFiniteSteps
from ddp_diffusion.posthoc import power_beta, sigma_rel_to_gamma
from ddp_diffusion.precision import autocast, bf16_is_fast, resolve_precision
from ddp_diffusion.sample import generate, save_grid
from ddp_diffusion.sources import open_source
from ddp_diffusion.tracking import Tracker, metrics_kept, new_run_id
from ddp_diffusion.utilisation import achieved_tflops, free_memory_bytes, peak_tflops

log = logging.getLogger("ddp_diffusion")


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier at a step: linear warmup, then constant or cosine down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate(tc: TrainConfig, step: int) -> float:
    """The learning rate of a step: a pure function of the config, so a changed schedule or
    train.lr takes effect on resume."""
    return tc.lr * lr_factor(step, tc.warmup_steps, tc.max_steps, tc.lr_schedule,
                             tc.min_lr_ratio)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers, stored in every checkpoint."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "torchvision", "torchmultimodal-nightly", "ddp-diffusion"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class Progress:
    """Where training stands; checkpointed as `progress`."""

    run_id: str  # the W&B run, continued on resume
    step: int = 0
    images_seen: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if value is not None:
                setattr(self, key, value)


class OptimizerState:
    """The optimizer as a checkpointed part: its moments are restored; its hyperparameters (lr,
    betas, weight decay, ...) stay those of the current config, so changing them on resume
    takes effect."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        self.opt.load_state_dict(state)
        for group, current in zip(self.opt.param_groups, settings, strict=True):
            group.update(current)


class ScalerState:
    """The fp16 loss scale as a checkpointed part. fp32 and bf16 runs save it empty; an fp16
    resume of such a run starts a new scale, and other precisions ignore a saved one."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def start_profiler(steps: int, out_dir: Path, env: DistEnv) -> torch.profiler.profile | None:
    """Profile `steps` training steps after 2 untimed ones; rank 0 writes a table and a trace."""
    if steps <= 0 or not env.is_main:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if env.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort_by = "self_cuda_time_total" if env.device.type == "cuda" else "self_cpu_time_total"

    def write(prof: torch.profiler.profile) -> None:
        files.write_text_atomic(out_dir / rundir.PROFILE,
                                prof.key_averages().table(sort_by=sort_by, row_limit=30))
        with tempfile.TemporaryDirectory() as tmp:  # torch opens a path as it finds it
            trace = Path(tmp) / rundir.TRACE
            prof.export_chrome_trace(str(trace))
            files.write_atomic(out_dir / rundir.TRACE, lambda f: f.write(trace.read_bytes()))
        log.info("profile of %d steps: %s (trace: open %s in https://ui.perfetto.dev)", steps,
                 out_dir / rundir.PROFILE, rundir.TRACE)

    prof = torch.profiler.profile(
        activities=activities, on_trace_ready=write,
        schedule=torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1))
    prof.start()
    return prof


@dataclass
class RunDirPlan:
    """What starting a run does to its directory, decided by reading it only."""

    resume: ResumePlan
    saved: dict[str, Any]  # the progress part of the checkpoint resumed ({}: a fresh start)
    snapshots_aside: list[Path]  # post-hoc snapshots that move aside with newer checkpoints
    metrics: str | None  # metrics.jsonl as it is kept (None: none, or a new run)


def plan_run_dir(cfg: Config) -> RunDirPlan:
    """Read out_dir and decide what to resume from (unusable or incompatible checkpoints and a
    bad metrics line are refused) and what moves aside; changes nothing."""
    out_dir = Path(cfg.out_dir)
    rundir.check_layout(out_dir)
    plan = checkpoint.plan_resume(cfg.train.resume, out_dir / rundir.CHECKPOINTS)
    if plan.state is not None:
        checkpoint.check_compatible(plan.state["config"], config.to_dict(cfg), plan.path)
    saved = plan.state[Part.PROGRESS] if plan.state is not None else {}
    metrics = None if plan.new_run else metrics_kept(out_dir / rundir.METRICS,
                                                     saved.get("step", 0))
    # Post-hoc snapshots past the resumed step are of steps this run trains again (or, from an
    # older checkpoint, of another lineage): archived, so no reconstruction mixes the two.
    newer = [] if plan.new_run else [p for s, p in rundir.list_snapshots(out_dir)
                                     if s > saved.get("step", 0)]
    return RunDirPlan(plan, saved, newer, metrics)


def prepare_run_dir(cfg: Config, lock: rundir.RunLock) -> tuple[ResumePlan, Tracker]:
    """Rank 0, before any training: lock out_dir, remove stale temp files, plan_run_dir, move
    an earlier run's files aside, write the resolved config and start the tracker."""
    out_dir = Path(cfg.out_dir)
    rundir.check_layout(out_dir)
    lock.acquire(cfg.train.lock_wait_s)
    rundir.remove_stale_temp_files(out_dir)
    p = plan_run_dir(cfg)
    # W&B starts (or fails with one line) before anything of an earlier run is moved.
    tracker = Tracker(cfg, p.saved.get("run_id") or new_run_id(), active=True)
    rundir.move_aside(out_dir, p.resume.move_aside, p.resume.new_run, p.snapshots_aside)
    config.save(cfg, out_dir / rundir.CONFIG)
    if p.metrics is not None:
        files.write_text_atomic(out_dir / rundir.METRICS, p.metrics)
    return p.resume, tracker


def activations_needed(model: nn.Module, cfg: Config, micro: int, precision: str) -> int:
    """Bytes of activations a micro-batch keeps for its backward (a lower bound)."""
    per_image = activation_bytes(model, cfg.model.image_size, cfg.model.in_channels)
    return micro * per_image // (1 if precision == "fp32" else 2)  # autocast halves most


def check_memory(model: nn.Module, cfg: Config, micro: int, precision: str, env: DistEnv
                 ) -> None:
    """Refuse, on every rank and before the run directory is touched, a micro-batch whose
    activations alone (a lower bound of what training needs) exceed the free memory."""
    need = activations_needed(model, cfg, micro, precision)
    free = free_memory_bytes(env.device)
    if distributed.agree_any([need > free])[0]:
        raise UserError(
            f"model.image_size={cfg.model.image_size}: a micro-batch of {micro} image(s) keeps "
            f"at least {need / 2**30:.1f} GiB of activations for the backward on each rank, more "
            f"than the {free / 2**30:.1f} GiB free on {env.device} (rank {env.rank}); lower "
            "train.batch_size or raise train.grad_accum, or use a smaller model.image_size")


def log_resume(state: dict[str, Any], path: str, cfg: Config, env: DistEnv) -> None:
    """Say what is resumed, which settings changed (they take effect now) and the world size."""
    step = int(state["step"])
    log.info("resuming from %s (step %d)", path, step)
    changed = checkpoint.changed_settings(state["config"], config.to_dict(cfg))
    if changed:
        log.info("settings changed since that checkpoint, in effect from step %d: %s", step,
                 "; ".join(changed))
    saved_world = state.get("world_size", env.world_size)
    if saved_world != env.world_size:
        log.warning("world size changed on resume: saved at %d, resumed at %d. The same global "
                    "batches and noise continue; the result matches an uninterrupted run up to "
                    "floating-point reduction order", saved_world, env.world_size)


def due(step: int, every: int, last: int) -> bool:
    """Whether a cadence of `every` steps (0: never) falls on this step; the last one always."""
    return every > 0 and (step % every == 0 or step == last)


def micro_batch_loss(model: nn.Module, diffusion: Diffusion, mb: Batch, channels_last: bool,
                     precision: str) -> Tensor:
    """The diffusion loss of one micro-batch: noise x0 to x_t, predict, compare."""
    x0 = mb.x0.contiguous(memory_format=torch.channels_last if channels_last
                          else torch.contiguous_format)
    with autocast(x0.device, precision):
        xt = diffusion.q_sample(x0, mb.noise, mb.t)
        out = model(xt, mb.t, mb.labels, mb.drop, mb.keys)
        return diffusion.loss(out, x0, xt, mb.noise, mb.t)


def settle_ddp_buckets(model: nn.Module, diffusion: Diffusion, zeros: Batch, channels_last: bool,
                       precision: str) -> None:
    """One backward of a zero loss through DDP before the first step of this process.

    DDP reduces a process's first backward in one bucket in parameter order and every later one
    in buckets packed by the order gradients arrived. On three or more ranks an element's sum
    order depends on its place in the bucket, so a resumed process's first step would round
    differently from the same step of a run that never stopped. After this, every step of every
    process reduces in the repacked layout. The gradients are zeros and are dropped; the data
    pipeline, the optimizer and every seeded draw are untouched."""
    (micro_batch_loss(model, diffusion, zeros, channels_last, precision) * 0).backward()
    for p in model.parameters():
        p.grad = None


def train_step(model: nn.Module, no_sync: Callable[[], contextlib.AbstractContextManager],
               diffusion: Diffusion, batches: list[Batch], opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, tc: TrainConfig, precision: str
               ) -> tuple[Tensor, Tensor]:
    """Forward and backward over this rank's micro-batches, then unscale and clip the gradients.

    Returns the step's mean loss and the gradient norm before clipping, both still on the
    device (no host sync). Gradients are all-reduced on the last micro-batch only.
    """
    step_loss = torch.zeros((), device=batches[0].x0.device)
    for k, mb in enumerate(batches):
        last = k == len(batches) - 1
        with contextlib.nullcontext() if last else no_sync():
            loss = micro_batch_loss(model, diffusion, mb, tc.channels_last, precision)
            scaler.scale(loss / len(batches)).backward()
        step_loss += loss.detach() / len(batches)
    scaler.unscale_(opt)
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if tc.grad_clip > 0:
        return step_loss, torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
    return step_loss, torch.nn.utils.get_total_norm([p.grad for p in params])


def apply_update(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: Tensor
                 ) -> None:
    """The optimizer step, which the fused AdamW turns into a no-op on the device where `skip`
    is set (weights, moments and step count stay: the `found_inf` input GradScaler uses); then
    the fp16 loss scale's update, which lowers it after an overflow."""
    opt.found_inf = skip.float()  # type: ignore[attr-defined]
    try:
        opt.step()
    finally:
        del opt.found_inf  # type: ignore[attr-defined]
    scaler.update()


def take_run_dir(cfg: Config, env: DistEnv, lock: rundir.RunLock
                 ) -> tuple[dict[str, Any] | None, str | None, Tracker]:
    """Rank 0 prepares the run directory and picks the checkpoint; every rank then holds that
    checkpoint's state (None: a fresh start), its path and the tracker of the run."""
    prepared = distributed.run_on_main(env.is_main, functools.partial(prepare_run_dir, cfg, lock))
    plan, tracker = prepared or (None, None)
    run_id, path = distributed.broadcast_object(
        (tracker.run_id, plan.path and str(plan.path)) if prepared else None)
    if tracker is None:
        tracker = Tracker(cfg, run_id, active=False)
    state = plan.state if plan is not None else None
    if path is not None and state is None:
        try:
            state = checkpoint.read(Path(path))
        except CheckpointError as e:
            raise UserError(f"rank {env.rank}: {e}") from None
    return state, path, tracker


def wrap_for_training(model: nn.Module, diffusion: Diffusion, cfg: Config, env: DistEnv,
                      micro: int, precision: str
                      ) -> tuple[nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """What the step calls: the model inside DDP when distributed (its buckets settled),
    compiled when asked; and the context that skips DDP's all-reduce (no_sync)."""
    if not env.distributed:
        return (torch.compile(model) if cfg.train.compile else model), contextlib.nullcontext
    ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
              gradient_as_bucket_view=True, bucket_cap_mb=25)
    train_model = torch.compile(ddp) if cfg.train.compile else ddp
    image_shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    settle_ddp_buckets(train_model, diffusion, Batch.zeros(micro, image_shape, env.device),
                       cfg.train.channels_last, precision)
    return train_model, ddp.no_sync


class Checkpointer:
    """Saves the checkpoint of a step on its cadence (train.ckpt_every and the last step), on a
    stop, or when told; never in a streak of non-finite steps, whose weights are suspect."""

    def __init__(self, manager: CheckpointManager, cfg: Config, env: DistEnv,
                 nonfinite: NonFiniteSteps) -> None:
        self.manager, self.cfg, self.env, self.nonfinite = manager, cfg, env, nonfinite

    def due(self, step: int) -> bool:
        return due(step, self.cfg.train.ckpt_every, self.cfg.train.max_steps)

    def newest(self) -> str:
        lineage = self.manager.lineage
        return str(lineage[max(lineage)]) if lineage else "none"

    def save(self, step: int) -> bool:
        """Rank 0 writes the checkpoint (every rank learns if that failed); whether it did."""
        if self.nonfinite.streak:
            if step == self.cfg.train.max_steps:
                raise TrainingDiverged(
                    f"training ended in {self.nonfinite.streak} non-finite step(s), so its "
                    f"weights were not saved; the newest checkpoint stays {self.newest()}. Lower "
                    "train.lr, set train.grad_clip, or use train.precision=fp32")
            log.warning("step %d: no checkpoint in a streak of non-finite steps; the newest "
                        "stays %s", step, self.newest())
            return False
        path = distributed.run_on_main(self.env.is_main, functools.partial(
            self.manager.save, step, {"config": config.to_dict(self.cfg),
                                      "world_size": self.env.world_size,
                                      "versions": library_versions()}))
        if path is not None:
            log.info("step %d: checkpoint %s", step, path)
        return True


class PosthocEMA:
    """The power-function EMAs of train.ema_posthoc, one per train.ema_posthoc_sigma_rels (fp32,
    updated on the device after every step), and their snapshots, written to out_dir/posthoc/
    every train.ema_posthoc_every steps and at the last. A checkpointed part (`posthoc_ema`)
    when enabled; otherwise it holds nothing and is never due."""

    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv) -> None:
        self.tc, self.env, self.out_dir = cfg.train, env, Path(cfg.out_dir)
        self.sigma_rels = list(self.tc.ema_posthoc_sigma_rels) if self.tc.ema_posthoc else []
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.emas = [EMA(model) for _ in self.sigma_rels]
        self.never = torch.zeros((), dtype=torch.bool, device=env.device)

    def update(self, model: nn.Module, step: int) -> None:
        """After optimizer step `step` (1, 2, ...): ema <- beta_t ema + (1 - beta_t) model. A
        skipped (non-finite) step advances them too: its weights are the previous step's, so
        each EMA stays the average of every step's weights under its profile, which is what
        the reconstruction assumes (holding it still would not be)."""
        for gamma, ema in zip(self.gammas, self.emas, strict=True):
            ema.update(model, power_beta(step, gamma), self.never)

    def due(self, step: int) -> bool:
        return bool(self.emas) and due(step, self.tc.ema_posthoc_every, self.tc.max_steps)

    def snapshot(self, step: int) -> dict[str, Any]:
        """What a snapshot file holds: tensors and plain values only (a weights_only load)."""
        return {"step": step, "sigma_rels": self.sigma_rels, "gammas": self.gammas,
                "emas": [{k: v.cpu() for k, v in ema.state_dict().items()}
                         for ema in self.emas]}

    def write(self, step: int) -> None:
        """Rank 0 writes the snapshot of `step` whole (every rank learns if that failed)."""
        path = rundir.snapshot_path(self.out_dir, step)
        distributed.run_on_main(self.env.is_main, lambda: files.write_atomic(
            path, lambda f: torch.save(self.snapshot(step), f)))

    def state_dict(self) -> dict[str, Any]:
        return {repr(s): ema.state_dict() for s, ema in zip(self.sigma_rels, self.emas,
                                                             strict=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state) != [repr(s) for s in self.sigma_rels]:
            raise UserError(f"the checkpoint's post-hoc EMAs are of sigma_rel {list(state)}, "
                            f"not train.ema_posthoc_sigma_rels={self.sigma_rels}")
        for s, ema in zip(self.sigma_rels, self.emas, strict=True):
            ema.load_state_dict(state[repr(s)])


class MetricsLog:
    """The log line on its cadence (train.log_every): loss and gradient norm of the steps since
    the last one that were not skipped, summed on the device; images/s, chip utilisation and
    data wait of the interval; written to the tracker and the progress bar."""

    def __init__(self, cfg: Config, env: DistEnv, tracker: Tracker, step: int,
                 train_gflop_per_image: float, peak_tflops: float | None) -> None:
        self.tc, self.tracker = cfg.train, tracker
        self.sums = torch.zeros(3, device=env.device)  # loss, grad norm, steps
        self.since_step, self.since = step, time.perf_counter()
        self.gflop, self.world_size, self.peak = train_gflop_per_image, env.world_size, peak_tflops
        self.bar = tqdm(total=self.tc.max_steps, initial=step, disable=not env.is_main,
                        unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    def add(self, loss: Tensor, grad_norm: Tensor, skip: Tensor) -> None:
        self.sums += torch.where(skip, 0.0, torch.stack([loss, grad_norm, torch.ones_like(loss)]))
        self.bar.update(1)

    def due(self, step: int) -> bool:
        return due(step, self.tc.log_every, self.tc.max_steps)

    def write(self, step: int, extra: dict[str, float], data_wait_s: float) -> None:
        """Log the interval that ends at `step` (plus `extra`), then start anew. The loss, grad
        norm (left out if every step was skipped) are averaged over ranks: their only host read.
        TFLOP/s are per device; data wait is this rank's fraction of the interval."""
        loss, norm, steps = distributed.mean_across_ranks(self.sums).tolist()
        now = time.perf_counter()
        out = {"loss": loss / steps, "grad_norm": norm / steps} if steps else {}
        out["images_per_s"] = self.tc.batch_size * (step - self.since_step) / (now - self.since)
        out["tflops"] = achieved_tflops(out["images_per_s"], self.gflop, self.world_size)
        if self.peak:
            out["peak_fraction"] = out["tflops"] / self.peak
        out["data_wait"] = data_wait_s / (now - self.since)
        self.sums.zero_()
        self.since_step, self.since = step, now
        self.tracker.log(step, out | extra)
        self.bar.set_postfix(loss=f"{out.get('loss', math.nan):.4f}",
                             img_s=f"{out['images_per_s']:.1f}")

    def close(self) -> None:
        self.bar.close()
        self.tracker.finish()


class Evaluator:
    """The sample grid (train.sample_every; rank 0, one row per class) and in-training FID
    (fid.every; all ranks) on their cadence, from the EMA (or the raw weights for the grid)."""

    def __init__(self, cfg: Config, env: DistEnv, model: nn.Module, ema: EMA,
                 diffusion: Diffusion, class_names: tuple[str, ...] | list[str],
                 precision: str, tracker: Tracker) -> None:
        self.cfg, self.env, self.model, self.ema = cfg, env, model, ema
        self.diffusion, self.class_names = diffusion, class_names
        self.precision, self.tracker = precision, tracker

    def due(self, step: int) -> bool:
        return self._grid_due(step) or self._fid_due(step)

    def _grid_due(self, step: int) -> bool:
        return due(step, self.cfg.train.sample_every, self.cfg.train.max_steps)

    def _fid_due(self, step: int) -> bool:
        return due(step, self.cfg.fid.every, self.cfg.train.max_steps)

    def run(self, step: int) -> bool:
        """What is due at this step; whether anything was."""
        cfg, s = self.cfg, self.cfg.sample
        if self._grid_due(step) and self.env.is_main:
            names = self.class_names
            labels = torch.arange(len(names), device=self.env.device).repeat_interleave(
                s.per_class)
            imgs = generate(self.ema.module if s.use_ema else self.model, self.diffusion, labels,
                            s.sampler, s.steps, s.guidance, seed=cfg.seed, eta=s.eta,
                            precision=self.precision, image_size=cfg.model.image_size,
                            channels=cfg.model.in_channels)
            path = save_grid(imgs, names, s.per_class,
                             Path(cfg.out_dir) / rundir.SAMPLES / f"step-{step:08d}.png")
            self.tracker.log_image(step, "samples", path)
        if self._fid_due(step):
            from ddp_diffusion.fid import METRICS, evaluate  # all ranks: a collective

            fid = evaluate(self.ema.module, self.diffusion, cfg, cfg.fid, cfg.seed,
                           self.precision)
            self.tracker.log(step, {k: fid[k] for k in METRICS if k in fid})
        return self.due(step)


class SyncPoint:
    """Where the host waits for the device: every train.sync_every steps, and wherever another
    component is due. It reads the non-finite steps since the last one (aborting a run that
    diverged), then agrees with every rank, in one tiny CPU collective, whether any got a stop
    signal or ran out of time, and whether rank 0 still holds the run directory's lock."""

    def __init__(self, cfg: Config, env: DistEnv, stop: signals.StopRequest,
                 lock: rundir.RunLock, nonfinite: NonFiniteSteps, progress: Progress,
                 newest_checkpoint: Callable[[], str]) -> None:
        self.tc, self.env, self.stop, self.lock = cfg.train, env, stop, lock
        self.nonfinite, self.progress = nonfinite, progress
        self.newest_checkpoint = newest_checkpoint
        self.deadline = (time.perf_counter() + 60 * self.tc.time_limit_minutes
                         if self.tc.time_limit_minutes > 0 else math.inf)

    def due(self, step: int) -> bool:
        return due(step, self.tc.sync_every, self.tc.max_steps)

    def check(self, step: int) -> tuple[bool, bool]:
        """(stop now, time is up), the same on every rank; raises if the run cannot go on."""
        diverged_at = self.nonfinite.read(step, self.tc.max_nonfinite)
        self.progress.nonfinite_total = self.nonfinite.total
        if diverged_at is not None:
            raise TrainingDiverged(
                f"loss was non-finite for {self.nonfinite.streak} steps in a row (up to step "
                f"{diverged_at}); last checkpoint: {self.newest_checkpoint()}; lower train.lr, "
                "set train.grad_clip, or use train.precision=fp32")
        lock_lost = self.env.is_main and self.lock.still_held()
        stop_now, time_up, lost = distributed.agree_any(
            [self.stop.requested, time.perf_counter() > self.deadline, bool(lock_lost)])
        if lost:  # another run writes out_dir now: stop before writing anything more
            raise WriteFailed(lock_lost or f"rank 0 lost {self.lock.path}; stopped at step {step}")
        return stop_now, time_up

    def timed_out(self, step: int) -> int:
        """Say that train.time_limit_minutes ended training; the exit code for it."""
        log.info("train.time_limit_minutes=%g reached at step %d", self.tc.time_limit_minutes,
                 step)
        return EXIT_OK

    def stop_requested(self) -> bool:
        """Whether any rank got a stop signal (a collective)."""
        return distributed.agree_any([self.stop.requested])[0]

    def stopped(self, step: int, saved: bool) -> int:
        """Say why and where training stopped; the exit code for it."""
        name = (signal.Signals(self.stop.signal).name if self.stop.signal
                else "another rank's signal")
        log.warning("stopped by %s at step %d%s; exit code %d (run the same command again to "
                    "resume)", name, step, " after saving a checkpoint" if saved else "",
                    EXIT_PREEMPTED)
        return EXIT_PREEMPTED


@dataclass
class Setup:
    """What a run is built from, all checked before its directory is touched."""

    cfg: Config  # with the data's number of classes and channels filled in
    source: Any  # sources.ImageSource
    diffusion: Diffusion
    model: nn.Module  # on the device, the same initial weights on every rank
    micro: int  # images per rank per micro-step
    precision: str
    gflop: float  # forward, per image


def set_up(cfg: Config, env: DistEnv) -> Setup:
    """The batch split, precision, data, model and memory check of a run (every rank)."""
    tc = cfg.train
    micro = check_batch(tc.batch_size, env.world_size, tc.grad_accum)
    precision = resolve_precision(tc.precision, env.device)
    if precision == "bf16" and not bf16_is_fast(env.device):
        log.warning("train.precision=bf16 but this %s has no native bf16 convolutions: expect it "
                    "to be several times slower than fp32 (use train.precision=auto)",
                    env.device.type)
    # Data first (fails fast, every image file checked): it decides the model's input channels
    # and number of classes.
    source = open_source(cfg.data, cfg.model.image_size, cfg.data.num_workers)
    cfg = dataclasses.replace(cfg, model=config.with_data_shape(
        cfg.model, len(source.class_names), source.channels))
    check_fits(tc.batch_size, len(source))
    # The model (same init on every rank: DDP checks), and whether a micro-batch fits.
    torch.manual_seed(cfg.seed)
    diffusion = Diffusion(cfg.diffusion)
    model = build_denoiser(cfg.model, diffusion.num_timesteps).to(env.device)
    gflop = forward_gflops(model, cfg.model.image_size, source.channels)
    check_memory(model, cfg, micro, precision, env)
    return Setup(cfg, source, diffusion, model, micro, precision, gflop)


class Trainer:
    """One training run, built once in __init__ (data, model, run directory, optimizer, the
    checkpointed parts, loader, and the components that decide their own cadence); `fit` is
    the loop and `train_one_step` its compute."""

    def __init__(self, cfg: Config, env: DistEnv, stop: signals.StopRequest,
                 lock: rundir.RunLock) -> None:
        tc = cfg.train
        self.env = env
        setup = set_up(cfg, env)
        self.cfg = cfg = setup.cfg
        self.micro, self.precision = setup.micro, setup.precision
        precision = setup.precision
        self.diffusion, self.model = setup.diffusion, setup.model
        source, model, gflop = setup.source, setup.model, setup.gflop

        state, resume_path, tracker = take_run_dir(cfg, env, lock)
        peak = peak_tflops(env.device, precision, tc.peak_tflops)
        log.info("model %s: %.2fM parameters, %.3f GFLOP forward per image; world size %d (%s, "
                 "%s); peak %s", cfg.model.name, count_parameters(model) / 1e6, gflop,
                 env.world_size, env.device, precision, f"{peak:g} TFLOP/s per device" if peak
                 else "unknown (set train.peak_tflops to log the fraction of it used)")
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.ema = EMA(model)
        self.posthoc = PosthocEMA(model, cfg, env)
        # Fused: one kernel for all parameters, and it skips a non-finite step on the device.
        self.opt = torch.optim.AdamW(model.parameters(), lr=learning_rate(tc, 0),
                                     betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay,
                                     fused=True)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
        self.progress = Progress(run_id=tracker.run_id)
        states: dict[str, checkpoint.Stateful] = {
            Part.MODEL: model, Part.EMA: self.ema, Part.OPTIMIZER: OptimizerState(self.opt),
            Part.GRAD_SCALER: ScalerState(self.scaler), Part.DATA: source,
            Part.PROGRESS: self.progress,
        }
        if tc.ema_posthoc:  # frozen on resume: the checkpoint has this part exactly when on
            states[Part.POSTHOC_EMA] = self.posthoc
        manager = CheckpointManager(Path(cfg.out_dir) / rundir.CHECKPOINTS, states,
                                    tc.keep_last, tc.milestone_every)
        if state is not None:
            manager.restore(state, resume_path)
            log_resume(state, resume_path, cfg, env)
            del state
        if tracker.wandb_dir:
            log.info("W&B run %s (%s) in %s", self.progress.run_id, cfg.tracking.wandb,
                     tracker.wandb_dir)
        self.loader = make_loader(source, cfg, env.rank, env.world_size, env.device,
                                  self.progress.step, self.diffusion.num_timesteps)
        self.train_model, self.no_sync = wrap_for_training(model, self.diffusion, cfg, env,
                                                           self.micro, precision)

        # The components; each decides when it is due.
        self.nonfinite = NonFiniteSteps(env.device, tc.sync_every, self.progress.nonfinite_total)
        self.ckpt = Checkpointer(manager, cfg, env, self.nonfinite)
        self.metrics = MetricsLog(cfg, env, tracker, self.progress.step, 3 * gflop, peak)
        self.evaluator = Evaluator(cfg, env, model, self.ema, self.diffusion,
                                   source.class_names, precision, tracker)
        self.sync = SyncPoint(cfg, env, stop, lock, self.nonfinite, self.progress,
                              self.ckpt.newest)
        self.ema_beta = math.nan  # of the newest step, for the log
        model.train()
        self.profiler = start_profiler(tc.profile_steps, Path(cfg.out_dir), env)

    def train_one_step(self) -> tuple[Tensor, Tensor, Tensor]:
        """One optimizer step (skipped on the device if it is not finite) and the EMA update;
        its loss, gradient norm and skip flag, all still on the device."""
        tc, p = self.cfg.train, self.progress
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(tc, p.step)
        batches = self.loader.micro_batches(p.step)
        loss, grad_norm = train_step(self.train_model, self.no_sync, self.diffusion, batches,
                                     self.opt, self.scaler, tc, self.precision)
        skip = self.nonfinite.record(loss, grad_norm, loss_scaling=self.scaler.is_enabled())
        apply_update(self.opt, self.scaler, skip)
        p.step += 1
        p.images_seen += tc.batch_size
        self.ema_beta = ema_beta(tc.batch_size, p.images_seen, tc.ema_halflife_kimg,
                                 tc.ema_rampup_ratio)
        self.ema.update(self.model, self.ema_beta, skip)
        self.posthoc.update(self.model, p.step)
        self.opt.zero_grad(set_to_none=True)
        if self.profiler is not None:
            self.profiler.step()
        return loss, grad_norm, skip

    def fit(self) -> int:
        """Train to train.max_steps; the exit code (0 done, 75 stopped by a signal)."""
        p, last = self.progress, self.cfg.train.max_steps
        try:
            if self.sync.stop_requested():  # a signal while starting up
                return self.sync.stopped(p.step, saved=False)
            while p.step < last:
                self.metrics.add(*self.train_one_step())
                step = p.step
                if not any(c.due(step) for c in (self.sync, self.metrics, self.ckpt,
                                                 self.evaluator, self.posthoc)):
                    continue  # the host did not wait for the device

                stop_now, time_up = self.sync.check(step)
                if self.metrics.due(step):
                    self.metrics.write(step, {
                        "lr": self.opt.param_groups[0]["lr"], "ema_beta": self.ema_beta,
                        "images_seen": p.images_seen, "nonfinite_total": p.nonfinite_total,
                    }, self.loader.take_wait())
                if self.posthoc.due(step):  # before a stop: the resumed run starts after it
                    self.posthoc.write(step)
                saved = (stop_now or time_up or self.ckpt.due(step)) and self.ckpt.save(step)
                if stop_now:
                    return self.sync.stopped(step, saved)
                if time_up:
                    return self.sync.timed_out(step)
                # Grids and FID come after the step's checkpoint; a signal that arrives while
                # they run is honoured as soon as they end.
                if self.evaluator.run(step) and step < last and self.sync.stop_requested():
                    return self.sync.stopped(step, saved or self.ckpt.save(step))
            log.info("done: step %d, %d images; checkpoints in %s", p.step, p.images_seen,
                     self.ckpt.manager.ckpt_dir)
            return EXIT_OK
        finally:
            if self.profiler is not None:
                self.profiler.stop()
            self.metrics.close()


def dry_run_report(given: Config, s: Setup, plan: RunDirPlan, env: DistEnv) -> str:
    """What train would do with this config, in words (rank 0 has the plan)."""
    from ddp_diffusion.config_docs import key_docs, yaml_value

    cfg, tc, r = s.cfg, s.cfg.train, plan.resume
    changed = [f"  {d.key} = {yaml_value(d.value)} (default {yaml_value(d.default)})"
               for d in key_docs(given) if d.value != d.default]
    params = sum(p.numel() for p in s.model.parameters())
    copies = 5 + (len(tc.ema_posthoc_sigma_rels) if tc.ema_posthoc else 0)  # fp32: see below
    states = params * 4 * copies
    acts = activations_needed(s.model, cfg, s.micro, s.precision)
    src = s.source
    step = int(plan.saved.get("step", 0))
    if r.path is None:
        resume = "start a new run at step 0"
    else:
        resume = f"resume from {r.path} (step {step})"
    out_dir = Path(cfg.out_dir)
    earlier = r.new_run and any((out_dir / n).exists() for n in rundir.RUN_FILES)
    if r.move_aside or plan.snapshots_aside or earlier:
        aside = (f"move {len(r.move_aside)} checkpoint(s) and "
                 + ("the earlier run's metrics, config, grids and post-hoc snapshots" if r.new_run
                    else f"{len(plan.snapshots_aside)} post-hoc snapshot(s)")
                 + f" to {out_dir / rundir.ARCHIVE}/")
    else:
        aside = "move nothing aside"
    run_id = plan.saved.get("run_id")
    wandb = ("W&B: disabled" if cfg.tracking.wandb == "disabled" else
             f"W&B ({cfg.tracking.wandb}): continue run {run_id}" if run_id and not r.new_run
             else f"W&B ({cfg.tracking.wandb}): a new run")
    return "\n".join([
        "dry run: everything train checks before it changes anything passed; nothing was "
        "trained or written",
        f"config: {len(changed)} key(s) differ from the defaults" + (":" if changed else ""),
        *changed,
        f"world size {env.world_size} ({env.device.type}, {s.precision}): global batch "
        f"{tc.batch_size} = {env.world_size} rank(s) x {tc.grad_accum} micro-step(s) x "
        f"{s.micro} image(s) per micro-batch",
        f"model {cfg.model.name}: {params / 1e6:.2f}M parameters, {s.gflop:.3f} GFLOP forward "
        "per image",
        # fp32 weights, gradients, AdamW's two moments, the EMA and each post-hoc EMA
        f"memory per rank (estimate): {states / 2**20:.0f} MiB of weights, gradients, optimizer "
        f"state and EMAs + at least {acts / 2**20:.0f} MiB of activations "
        f"({s.micro} image(s)) = {(states + acts) / 2**30:.2f} GiB",
        f"data: {src.dataset}, {len(src)} images, {len(src.class_names)} class(es), "
        f"{src.channels} channel(s), fingerprint {src.fingerprint}"
        + (f", content {src.content[:16]}" if src.content else ""),
        f"out_dir {cfg.out_dir}: {resume}; {aside}",
        wandb,
    ])


def dry_run(cfg: Config) -> int:
    """train --dry-run: every check train makes before it changes anything, on every rank, and
    what it would then do (printed by rank 0); writes nothing."""
    env = distributed.init(cfg.train.num_threads, cfg.train.deterministic)
    try:
        setup = set_up(cfg, env)
        plan = distributed.run_on_main(env.is_main, lambda: plan_run_dir(setup.cfg))
        if env.is_main:
            print(dry_run_report(cfg, setup, plan, env), flush=True)
        return 0
    finally:
        distributed.shutdown()


def train(cfg: Config, stop: signals.StopRequest | None = None) -> int:
    """Train as configured; returns the exit code (0 done, 75 stopped by a signal after saving).
    `stop`: the handlers the caller installed already (else installed here)."""
    stop = stop or signals.StopRequest()  # before the rendezvous, which can take minutes
    lock = rundir.RunLock(Path(cfg.out_dir))
    try:
        env = distributed.init(cfg.train.num_threads, cfg.train.deterministic)
        if not env.is_main:
            logging.getLogger("ddp_diffusion").setLevel(logging.WARNING)  # other ranks stay quiet
        return Trainer(cfg, env, stop, lock).fit()
    finally:
        lock.release()
        distributed.shutdown()
