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
from ddp_diffusion.checkpoint import CheckpointManager, ResumePlan
from ddp_diffusion.config import Config, TrainConfig
from ddp_diffusion.data import Batch, check_batch, check_fits, make_loader
from ddp_diffusion.diffusion import Diffusion
from ddp_diffusion.distributed import DistEnv
from ddp_diffusion.ema import EMA, ema_beta
from ddp_diffusion.errors import (
    EXIT_OK,
    EXIT_PREEMPTED,
    TrainingDiverged,
    UserError,
    WriteFailed,
)
from ddp_diffusion.model import (
    activation_bytes,
    build_denoiser,
    count_parameters,
    forward_gflops,
)
from ddp_diffusion.nonfinite import NonFiniteSteps
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


def prepare_run_dir(cfg: Config, lock: rundir.RunLock) -> tuple[ResumePlan, Tracker]:
    """Rank 0, before any training: lock out_dir, remove stale temp files, decide what to resume
    from (unusable or incompatible checkpoints are refused before anything changes), move an
    earlier run's files aside, write the resolved config and start the tracker."""
    out_dir = Path(cfg.out_dir)
    rundir.check_layout(out_dir)
    lock.acquire(cfg.train.lock_wait_s)
    rundir.remove_stale_temp_files(out_dir)
    plan = checkpoint.plan_resume(cfg.train.resume, out_dir / rundir.CHECKPOINTS)
    if plan.state is not None:
        checkpoint.check_compatible(plan.state["config"], config.to_dict(cfg), plan.path)
    saved = plan.state["progress"] if plan.state is not None else {}
    metrics = None if plan.new_run else metrics_kept(out_dir / rundir.METRICS,
                                                     saved.get("step", 0))
    # W&B starts (or fails with one line) before anything of an earlier run is moved.
    tracker = Tracker(cfg, saved.get("run_id") or new_run_id(), active=True)
    rundir.move_aside(out_dir, plan.move_aside, plan.new_run)
    config.save(cfg, out_dir / rundir.CONFIG)
    if metrics is not None:
        files.write_text_atomic(out_dir / rundir.METRICS, metrics)
    return plan, tracker


def check_memory(model: nn.Module, cfg: Config, micro: int, precision: str, env: DistEnv
                 ) -> None:
    """Refuse, on every rank and before the run directory is touched, a micro-batch whose
    activations alone (a lower bound of what training needs) exceed the free memory."""
    per_image = activation_bytes(model, cfg.model.image_size, cfg.model.in_channels)
    need = micro * per_image // (1 if precision == "fp32" else 2)  # autocast halves most
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


class LogWindow:
    """Loss and gradient norm of the steps since the last log that were not skipped, summed on
    the device; and the images/s and chip utilisation of the interval."""

    def __init__(self, device: torch.device, step: int, train_gflop_per_image: float,
                 world_size: int, peak_tflops: float | None) -> None:
        self.sums = torch.zeros(3, device=device)  # loss, grad norm, steps
        self.since_step, self.since = step, time.perf_counter()
        self.gflop, self.world_size, self.peak = train_gflop_per_image, world_size, peak_tflops

    def add(self, loss: Tensor, grad_norm: Tensor, skip: Tensor) -> None:
        self.sums += torch.where(skip, 0.0, torch.stack([loss, grad_norm, torch.ones_like(loss)]))

    def close(self, step: int, batch_size: int, data_wait_s: float) -> dict[str, float]:
        """Loss, grad norm (left out if every step was skipped), images/s, TFLOP/s per device
        and its fraction of the peak (where one is known), and the fraction of the interval
        spent waiting for data (on this rank); then start anew.

        The only host read of the loss: once per log interval, averaged over ranks."""
        loss, norm, steps = distributed.mean_across_ranks(self.sums).tolist()
        now = time.perf_counter()
        out = {"loss": loss / steps, "grad_norm": norm / steps} if steps else {}
        out["images_per_s"] = batch_size * (step - self.since_step) / (now - self.since)
        out["tflops"] = achieved_tflops(out["images_per_s"], self.gflop, self.world_size)
        if self.peak:
            out["peak_fraction"] = out["tflops"] / self.peak
        out["data_wait"] = data_wait_s / (now - self.since)
        self.sums.zero_()
        self.since_step, self.since = step, now
        return out


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


def train(cfg: Config, stop: signals.StopRequest | None = None) -> int:
    """Train as configured; returns the exit code (0 done, 75 stopped by a signal after saving).
    `stop`: the handlers the caller installed already (else installed here)."""
    stop = stop or signals.StopRequest()  # before the rendezvous, which can take minutes
    lock = rundir.RunLock(Path(cfg.out_dir))
    try:
        env = distributed.init(cfg.train.num_threads, cfg.train.deterministic)
        if not env.is_main:
            logging.getLogger("ddp_diffusion").setLevel(logging.WARNING)  # other ranks stay quiet
        return _train(cfg, env, stop, lock)
    finally:
        lock.release()
        distributed.shutdown()


def _train(cfg: Config, env: DistEnv, stop: signals.StopRequest,
           lock: rundir.RunLock) -> int:
    tc = cfg.train
    micro = check_batch(tc.batch_size, env.world_size, tc.grad_accum)
    precision = resolve_precision(tc.precision, env.device)
    if precision == "bf16" and not bf16_is_fast(env.device):
        log.warning("train.precision=bf16 but this %s has no native bf16 convolutions: expect "
                    "it to be several times slower than fp32 (use train.precision=auto)",
                    env.device.type)
    out_dir = Path(cfg.out_dir)

    # Data first (fails fast, every image file checked): it decides the model's input channels
    # and number of classes.
    source = open_source(cfg.data, cfg.model.image_size, cfg.data.num_workers)
    cfg = dataclasses.replace(cfg, model=config.with_data_shape(
        cfg.model, len(source.class_names), source.channels))
    check_fits(tc.batch_size, len(source))  # before the run directory is touched

    # The model (same init on every rank: DDP checks), and whether a micro-batch of it fits.
    torch.manual_seed(cfg.seed)
    diffusion = Diffusion(cfg.diffusion)
    model = build_denoiser(cfg.model, diffusion.num_timesteps).to(env.device)
    gflop = forward_gflops(model, cfg.model.image_size, source.channels)
    check_memory(model, cfg, micro, precision, env)

    # Rank 0 takes the run directory and picks the checkpoint; every rank then loads that one.
    prepared = distributed.run_on_main(env.is_main, functools.partial(prepare_run_dir, cfg, lock))
    plan, tracker = prepared or (None, None)
    run_id, resume_path = distributed.broadcast_object(
        (tracker.run_id, plan.path and str(plan.path)) if prepared else None)
    if tracker is None:
        tracker = Tracker(cfg, run_id, active=False)
    state = plan.state if plan is not None else None
    if resume_path is not None and state is None:
        try:
            state = checkpoint.read(Path(resume_path))
        except checkpoint.CheckpointError as e:
            raise UserError(f"rank {env.rank}: {e}") from None

    # EMA, optimizer, loss scaler.
    peak = peak_tflops(env.device, precision, tc.peak_tflops)
    log.info("model %s: %.2fM parameters, %.3f GFLOP forward per image; world size %d (%s, %s); "
             "peak %s", cfg.model.name, count_parameters(model) / 1e6, gflop, env.world_size,
             env.device, precision, f"{peak:g} TFLOP/s per device" if peak else
             "unknown (set train.peak_tflops to log the fraction of it used)")
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model)
    # Fused: one kernel for all parameters, and it skips a non-finite step on the device.
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate(tc, 0),
                            betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    progress = Progress(run_id=run_id)
    ckpt = CheckpointManager(out_dir / rundir.CHECKPOINTS, {
        "model": model, "ema": ema, "optimizer": OptimizerState(opt),
        "grad_scaler": ScalerState(scaler), "data": source, "progress": progress,
    }, tc.keep_last, tc.milestone_every)
    if state is not None:
        ckpt.restore(state, resume_path)
        log_resume(state, resume_path, cfg, env)
        del state, plan
    if tracker.wandb_dir:
        log.info("W&B run %s (%s) in %s", progress.run_id, cfg.tracking.wandb, tracker.wandb_dir)
    loader = make_loader(source, cfg, env.rank, env.world_size, env.device, progress.step,
                         diffusion.num_timesteps)

    # What the step calls: the model, inside DDP when distributed, compiled when asked.
    train_model: nn.Module = model
    ddp = None
    if env.distributed:
        ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                  gradient_as_bucket_view=True, bucket_cap_mb=25)
        train_model = ddp
    if tc.compile:
        train_model = torch.compile(train_model)
    no_sync = ddp.no_sync if ddp is not None else contextlib.nullcontext
    if ddp is not None:
        image_shape = (source.channels, cfg.model.image_size, cfg.model.image_size)
        settle_ddp_buckets(train_model, diffusion, Batch.zeros(micro, image_shape, env.device),
                           tc.channels_last, precision)

    def newest_checkpoint() -> str:
        return str(ckpt.lineage[max(ckpt.lineage)]) if ckpt.lineage else "none"

    def save_checkpoint() -> bool:
        """Rank 0 writes the checkpoint of this step (every rank learns if that failed); not in
        a streak of non-finite steps, whose weights are suspect: the good one stays newest."""
        if nonfinite.streak:
            if progress.step == tc.max_steps:
                raise TrainingDiverged(
                    f"training ended in {nonfinite.streak} non-finite step(s), so its weights "
                    f"were not saved; the newest checkpoint stays {newest_checkpoint()}. Lower "
                    "train.lr, set train.grad_clip, or use train.precision=fp32")
            log.warning("step %d: no checkpoint in a streak of non-finite steps; the newest "
                        "stays %s", progress.step, newest_checkpoint())
            return False
        path = distributed.run_on_main(env.is_main, functools.partial(
            ckpt.save, progress.step, {"config": config.to_dict(cfg),
                                       "world_size": env.world_size,
                                       "versions": library_versions()}))
        if path is not None:
            log.info("step %d: checkpoint %s", progress.step, path)
        return True

    def grid_and_fid(step: int) -> bool:
        """The sample grid (rank 0: one row per class) and in-training FID (all ranks) due at
        this step; whether any was."""
        s = cfg.sample
        grid_due = due(step, tc.sample_every, tc.max_steps)
        fid_due = due(step, cfg.fid.every, tc.max_steps)
        if grid_due and env.is_main:
            names = source.class_names
            labels = torch.arange(len(names), device=env.device).repeat_interleave(s.per_class)
            imgs = generate(ema.module if s.use_ema else model, diffusion, labels, s.sampler,
                            s.steps, s.guidance, seed=cfg.seed, eta=s.eta, precision=precision,
                            image_size=cfg.model.image_size, channels=source.channels)
            path = save_grid(imgs, names, s.per_class,
                             out_dir / rundir.SAMPLES / f"step-{step:08d}.png")
            tracker.log_image(step, "samples", path)
        if fid_due:
            from ddp_diffusion.fid import evaluate  # all ranks: compute() is a collective

            fid = evaluate(ema.module, diffusion, cfg, cfg.fid, cfg.seed, precision)
            tracker.log(step, {k: fid[k] for k in ("fid", "class_accuracy") if k in fid})
        return grid_due or fid_due

    def stopped(step: int, saved: bool) -> int:
        name = signal.Signals(stop.signal).name if stop.signal else "another rank's signal"
        log.warning("stopped by %s at step %d%s; exit code %d (run the same command again to "
                    "resume)", name, step, " after saving a checkpoint" if saved else "",
                    EXIT_PREEMPTED)
        return EXIT_PREEMPTED

    progress_bar = tqdm(total=tc.max_steps, initial=progress.step, disable=not env.is_main,
                        unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    window = LogWindow(env.device, progress.step, 3 * gflop, env.world_size, peak)
    nonfinite = NonFiniteSteps(env.device, tc.sync_every, progress.nonfinite_total)
    # The host waits for the device only at sync points: every train.sync_every steps, and
    # wherever a log line, checkpoint, grid or FID is due.
    cadences = (tc.sync_every, tc.log_every, tc.ckpt_every, tc.sample_every, cfg.fid.every)
    deadline = (time.perf_counter() + 60 * tc.time_limit_minutes if tc.time_limit_minutes > 0
                else math.inf)
    model.train()
    profiler = start_profiler(tc.profile_steps, out_dir, env)
    try:
        if distributed.agree_any([stop.requested])[0]:  # a signal while starting up
            return stopped(progress.step, saved=False)
        while progress.step < tc.max_steps:
            step = progress.step
            for group in opt.param_groups:
                group["lr"] = learning_rate(tc, step)
            batches = loader.micro_batches(step)
            loss, grad_norm = train_step(train_model, no_sync, diffusion, batches, opt, scaler,
                                         tc, precision)
            skip = nonfinite.record(loss, grad_norm, loss_scaling=scaler.is_enabled())
            apply_update(opt, scaler, skip)
            progress.step = step = step + 1
            progress.images_seen += tc.batch_size
            ema.update(model, ema_beta(tc.batch_size, progress.images_seen,
                                       tc.ema_halflife_kimg, tc.ema_rampup_ratio), skip)
            window.add(loss, grad_norm, skip)
            opt.zero_grad(set_to_none=True)
            progress_bar.update(1)
            if profiler is not None:
                profiler.step()
            if not any(due(step, every, tc.max_steps) for every in cadences):
                continue

            # A sync point. The non-finite steps since the last one, as they happened; then one
            # tiny CPU collective: did any rank get a stop signal or run out of time?
            diverged_at = nonfinite.read(step, tc.max_nonfinite)
            progress.nonfinite_total = nonfinite.total
            if diverged_at is not None:
                raise TrainingDiverged(
                    f"loss was non-finite for {nonfinite.streak} steps in a row (up to step "
                    f"{diverged_at}); last checkpoint: {newest_checkpoint()}; lower train.lr, "
                    "set train.grad_clip, or use train.precision=fp32")
            lock_lost = env.is_main and lock.still_held()
            stop_now, time_up, lost = distributed.agree_any(
                [stop.requested, time.perf_counter() > deadline, bool(lock_lost)])
            if lost:  # another run writes out_dir now: stop before writing anything more
                raise WriteFailed(lock_lost or f"rank 0 lost {lock.path}; stopped at step {step}")
            if due(step, tc.log_every, tc.max_steps):
                metrics = window.close(step, tc.batch_size, loader.take_wait()) | {
                    "lr": opt.param_groups[0]["lr"],
                    "ema_beta": ema_beta(tc.batch_size, progress.images_seen,
                                         tc.ema_halflife_kimg, tc.ema_rampup_ratio),
                    "images_seen": progress.images_seen,
                    "nonfinite_total": progress.nonfinite_total,
                }
                tracker.log(step, metrics)
                progress_bar.set_postfix(loss=f"{metrics.get('loss', math.nan):.4f}",
                                         img_s=f"{metrics['images_per_s']:.1f}")
            saved = ((stop_now or time_up or due(step, tc.ckpt_every, tc.max_steps))
                     and save_checkpoint())
            if stop_now:
                return stopped(step, saved)
            if time_up:
                log.info("train.time_limit_minutes=%g reached at step %d", tc.time_limit_minutes,
                         step)
                return EXIT_OK

            # Grids and FID come after the step's checkpoint; a signal that arrives while they
            # run is honoured as soon as they end.
            if (grid_and_fid(step) and step < tc.max_steps
                    and distributed.agree_any([stop.requested])[0]):
                return stopped(step, saved or save_checkpoint())
        log.info("done: step %d, %d images; checkpoints in %s", progress.step,
                 progress.images_seen, ckpt.ckpt_dir)
        return EXIT_OK
    finally:
        if profiler is not None:
            profiler.stop()
        progress_bar.close()
        tracker.finish()
