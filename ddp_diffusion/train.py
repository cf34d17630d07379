"""The training loop: one function, read top to bottom, single-process or under torchrun.

Exact resumption: every random draw of step s (data order, timesteps, noise, label dropout,
model dropout) is a pure function of (seed, s), and a checkpoint holds everything else that
changes (weights, EMA, optimizer, LR schedule, grad scaler, RNG states), so a run resumed
from step k continues bitwise identically to one that never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ddp_diffusion import checkpoint, config, distributed
from ddp_diffusion.config import Config
from ddp_diffusion.data import InMemoryData, check_batch, derive_seed, load_split
from ddp_diffusion.diffusion import Diffusion
from ddp_diffusion.distributed import DistEnv
from ddp_diffusion.ema import EMA, ema_beta
from ddp_diffusion.model import build_denoiser, count_parameters, forward_gflops
from ddp_diffusion.sample import autocast, bf16_is_fast, generate, resolve_precision, save_grid
from ddp_diffusion.tracking import Tracker, new_run_id

log = logging.getLogger("ddp_diffusion")

EXIT_OK = 0
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; run again to continue


class TrainingDiverged(RuntimeError):
    """The loss was non-finite for too many steps in a row."""


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier at a step: linear warmup, then constant or cosine down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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


def rng_state(env: DistEnv) -> dict[str, torch.Tensor]:
    """This rank's CPU (and CUDA) RNG state."""
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def start_profiler(steps: int, out_dir: Path, env: DistEnv) -> torch.profiler.profile | None:
    """Profile `steps` training steps after 2 untimed ones; rank 0 writes a table and a trace."""
    if steps <= 0 or not env.is_main:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if env.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort_by = "self_cuda_time_total" if env.device.type == "cuda" else "self_cpu_time_total"

    def write(prof: torch.profiler.profile) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "profile.txt").write_text(
            prof.key_averages().table(sort_by=sort_by, row_limit=30))
        prof.export_chrome_trace(str(out_dir / "profile_trace.json"))
        log.info("profile of %d steps: %s (trace: open profile_trace.json in "
                 "https://ui.perfetto.dev)", steps, out_dir / "profile.txt")

    prof = torch.profiler.profile(
        activities=activities, on_trace_ready=write,
        schedule=torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1))
    prof.start()
    return prof


def train(cfg: Config) -> int:
    """Train as configured; returns the exit code (0 done, 75 stopped by a signal after saving)."""
    env = distributed.init(cfg.train.num_threads)
    if not env.is_main:
        logging.getLogger("ddp_diffusion").setLevel(logging.WARNING)  # other ranks stay quiet
    stop = distributed.StopRequest()
    try:
        return _train(cfg, env, stop)
    finally:
        stop.restore()
        distributed.shutdown()


def _train(cfg: Config, env: DistEnv, stop: distributed.StopRequest) -> int:
    tc = cfg.train
    check_batch(tc.batch_size, env.world_size, tc.grad_accum)
    precision = resolve_precision(tc.precision, env.device)
    if precision == "bf16" and not bf16_is_fast(env.device):
        log.warning("train.precision=bf16 but this %s has no native bf16 convolutions: expect "
                    "it to be several times slower than fp32 (use train.precision=auto)",
                    env.device.type)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"

    # Data first (fails fast): the whole training set lives on the device, and the batches
    # are deterministic per step.
    images, labels = load_split(cfg.data.root, train=True, debian_dir=cfg.data.debian_dir,
                                download=cfg.data.download)
    data = InMemoryData(images, labels, tc.batch_size, cfg.seed, env.device, cfg.model.image_size)

    # Resume: rank 0 picks the newest checkpoint that loads cleanly; every rank loads that one.
    found = checkpoint.resolve_resume(tc.resume, ckpt_dir) if env.is_main else None
    resume_path = distributed.broadcast_object(str(found[0]) if found else None)
    state: dict[str, Any] | None = None
    if resume_path is not None:
        state = found[1] if found else checkpoint.load(Path(resume_path))
        changed = checkpoint.check_compatible(state["config"], config.to_dict(cfg), resume_path)
        log.info("resuming from %s (step %d)%s", resume_path, state["step"],
                 f"; changed settings: {', '.join(changed)}" if changed else "")
    if env.is_main:
        config.save(cfg, out_dir / "config.yaml")

    # Model, EMA, optimizer, LR schedule, loss scaler. Same init on every rank (DDP checks).
    torch.manual_seed(cfg.seed)
    diffusion = Diffusion(cfg.diffusion)
    model = build_denoiser(cfg.model, diffusion.num_timesteps).to(env.device)
    log.info("model %s: %.2fM parameters, %.3f GFLOP forward per image; world size %d (%s, %s)",
             cfg.model.name, count_parameters(model) / 1e6,
             forward_gflops(model, cfg.model.image_size), env.world_size, env.device, precision)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas),
                            weight_decay=tc.weight_decay,
                            fused=env.device.type == "cuda" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
        lr_factor, warmup=tc.warmup_steps, total=tc.max_steps, schedule=tc.lr_schedule,
        min_ratio=tc.min_lr_ratio))
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")

    step, images_seen, run_id = 0, 0, new_run_id()
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        scaler.load_state_dict(state["grad_scaler"])
        step, images_seen = int(state["step"]), int(state["images_seen"])
        run_id = state["wandb_run_id"]
        saved_rng = state["rng"]
        if len(saved_rng) == env.world_size:
            torch.set_rng_state(saved_rng[env.rank]["cpu"])
            if "cuda" in saved_rng[env.rank] and env.device.type == "cuda":
                torch.cuda.set_rng_state(saved_rng[env.rank]["cuda"], env.device)
        del state

    ddp = model
    if env.distributed:
        ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                  gradient_as_bucket_view=True, bucket_cap_mb=25)
    forward = torch.compile(ddp) if tc.compile else ddp
    tracker = Tracker(cfg, run_id, active=env.is_main, resumed_step=step)
    if tracker.wandb_dir:
        log.info("W&B run %s (%s) in %s", run_id, cfg.tracking.wandb, tracker.wandb_dir)

    def save_checkpoint() -> Path | None:
        """All ranks gather RNG states; rank 0 writes the file atomically."""
        rngs = distributed.all_gather_objects(rng_state(env))
        if not env.is_main:
            return None
        epoch, index = data.position(step)
        return checkpoint.save({
            "step": step, "images_seen": images_seen,
            "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "lr_schedule": sched.state_dict(),
            "grad_scaler": scaler.state_dict(),
            "data_position": {"epoch": epoch, "batch_in_epoch": index,
                              "steps_per_epoch": data.steps_per_epoch},
            "rng": rngs, "world_size": env.world_size,
            "config": config.to_dict(cfg), "wandb_run_id": run_id,
            "versions": library_versions(),
        }, ckpt_dir, step, tc.keep_last, tc.milestone_every)

    def sample_grid() -> None:
        """Rank 0 draws one row per class with the EMA weights and logs the grid."""
        s = cfg.sample
        classes = list(range(cfg.model.num_classes))
        labels_ = torch.arange(len(classes), device=env.device).repeat_interleave(s.per_class)
        imgs = generate(ema.module, diffusion, labels_, s.sampler, s.steps, s.guidance,
                        seed=cfg.seed, eta=s.eta, precision=precision,
                        image_size=cfg.model.image_size)
        path = save_grid(imgs, classes, s.per_class, out_dir / "samples" / f"step-{step:08d}.png")
        tracker.log_image(step, "samples", path)

    progress = tqdm(total=tc.max_steps, initial=step, disable=not env.is_main, unit="step",
                    dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    loss_acc = torch.zeros((), device=env.device)
    norm_acc = torch.zeros((), device=env.device)
    logged_steps, nonfinite_streak, nonfinite_total = 0, 0, 0
    t_last, step_last = time.perf_counter(), step
    deadline = t_last + 60 * tc.time_limit_minutes if tc.time_limit_minutes > 0 else math.inf
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model.train()
    profiler = start_profiler(tc.profile_steps, out_dir, env)
    try:
        while step < tc.max_steps:
            # Seed global-RNG consumers (e.g. dropout) per step: a function of (seed, step, rank).
            torch.manual_seed(derive_seed(cfg.seed, "global", step, env.rank))
            step_loss = torch.zeros((), device=env.device)
            micro_batches = data.micro_batches(step, env.rank, env.world_size, tc.grad_accum,
                                               diffusion.num_timesteps, cfg.diffusion.cfg_dropout)
            for k, mb in enumerate(micro_batches):
                # Gradients are all-reduced only on the last micro-step.
                last = k == len(micro_batches) - 1
                sync = contextlib.nullcontext() if last or not env.distributed else ddp.no_sync()
                x0 = mb.x0.contiguous(memory_format=memory_format)
                with sync:
                    with autocast(env.device, precision):
                        xt = diffusion.q_sample(x0, mb.noise, mb.t)
                        out = forward(xt, mb.t, mb.labels, mb.drop)
                        loss = diffusion.loss(out, x0, xt, mb.noise, mb.t)
                    scaler.scale(loss / len(micro_batches)).backward()
                step_loss += loss.detach() / len(micro_batches)

            scaler.unscale_(opt)
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip > 0
                         else torch.nn.utils.get_total_norm([p.grad for p in params]))
            # One tiny CPU collective per step: did any rank get a stop signal, run out of time
            # or see a non-finite loss?
            stop_now, time_up, bad = distributed.agree_any([
                stop.requested, time.perf_counter() > deadline,
                not bool(torch.isfinite(step_loss))])
            step += 1
            images_seen += tc.batch_size
            if bad:
                nonfinite_streak += 1
                nonfinite_total += 1
                log.warning("step %d: non-finite loss, update skipped (%d in a row, %d total)",
                            step, nonfinite_streak, nonfinite_total)
                if nonfinite_streak >= tc.max_nonfinite:
                    newest = checkpoint.list_checkpoints(ckpt_dir)
                    raise TrainingDiverged(
                        f"loss was non-finite for {nonfinite_streak} steps in a row (up to step "
                        f"{step}); last checkpoint: {newest[-1][1] if newest else 'none'}; "
                        "lower train.lr, set train.grad_clip, or use train.precision=fp32")
            else:
                nonfinite_streak = 0
                scaler.step(opt)
                ema.update(model, ema_beta(tc.batch_size, images_seen, tc.ema_halflife_kimg,
                                           tc.ema_rampup_ratio))
                loss_acc += step_loss
                norm_acc += grad_norm
                logged_steps += 1
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            progress.update(1)
            if profiler is not None:
                profiler.step()

            if step % tc.log_every == 0 or step == tc.max_steps:
                # The only host sync of the loss: once per log interval, averaged over ranks.
                means = distributed.mean_across_ranks(torch.stack([loss_acc, norm_acc]))
                now = time.perf_counter()
                n = max(logged_steps, 1)
                metrics = {
                    "loss": float(means[0]) / n, "grad_norm": float(means[1]) / n,
                    "lr": opt.param_groups[0]["lr"],
                    "images_per_s": tc.batch_size * (step - step_last) / (now - t_last),
                    "ema_beta": ema_beta(tc.batch_size, images_seen, tc.ema_halflife_kimg,
                                         tc.ema_rampup_ratio),
                    "images_seen": images_seen, "nonfinite_total": nonfinite_total,
                }
                tracker.log(step, metrics)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                                     img_s=f"{metrics['images_per_s']:.1f}")
                loss_acc.zero_()
                norm_acc.zero_()
                logged_steps, t_last, step_last = 0, now, step
            if env.is_main and tc.sample_every and (step % tc.sample_every == 0
                                                   or step == tc.max_steps):
                sample_grid()
            if cfg.fid.every and (step % cfg.fid.every == 0 or step == tc.max_steps):
                from ddp_diffusion.fid import evaluate  # all ranks: compute() is a collective

                fid = evaluate(ema.module, diffusion, cfg, cfg.fid, cfg.seed, precision)
                tracker.log(step, {k: fid[k] for k in ("fid", "class_accuracy")})
            if stop_now or time_up or step % tc.ckpt_every == 0 or step == tc.max_steps:
                path = save_checkpoint()
                if path is not None:
                    log.info("step %d: checkpoint %s", step, path)
            if stop_now:
                name = signal.Signals(stop.signal).name if stop.signal else "another rank's signal"
                log.warning("stopped by %s at step %d after saving a checkpoint; exit code %d "
                            "(run the same command again to resume)", name, step, EXIT_PREEMPTED)
                return EXIT_PREEMPTED
            if time_up:
                log.info("train.time_limit_minutes=%g reached at step %d; checkpoint saved",
                         tc.time_limit_minutes, step)
                return EXIT_OK
        log.info("done: step %d, %d images; checkpoints in %s", step, images_seen, ckpt_dir)
        return EXIT_OK
    finally:
        if profiler is not None:
            profiler.stop()
        progress.close()
        tracker.finish()
