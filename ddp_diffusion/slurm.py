"""SLURM: submit training through submitit, set up torch.distributed in the job, requeue on a stop.

In the job, every task runs `SlurmTrainer.__call__`: it exports RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR (the first node) and MASTER_PORT (derived from the job id) with
submitit's `TorchDistributedEnvironment`, then runs the same `train()` as torchrun does.

A stop signal (USR2 from `--signal` before the time limit or from submitit's interrupt, SIGTERM
from `scontrol requeue` or preemption) makes every rank finish its step, save a checkpoint and
return 75. Then, if SLURM still lists the job as RUNNING (a warning signal: nobody else ends it),
rank 0 writes `checkpoint()`'s `DelayedSubmission` and requeues the job itself, up to
`max_requeues` times; otherwise SLURM is ending the job and requeues it or not (requeue and
preemption do, `scancel` and a hard time limit do not). Either way the next run resumes from the
newest checkpoint, bitwise exactly, in the same W&B run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

import submitit
from submitit.core import utils as submitit_utils

from ddp_diffusion import checkpoint, rundir, sweeps
from ddp_diffusion.config import Config, check_batch, load
from ddp_diffusion.errors import EXIT_PREEMPTED, RequeueLimitReached, UserError
from ddp_diffusion.signals import STOP_SIGNALS
from ddp_diffusion.submit_options import SubmitOptions
from ddp_diffusion.train import train

log = logging.getLogger("ddp_diffusion")

TIME_FORMATS = "MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
# Pending reasons of a job that sbatch accepted but the partition can never run.
NEVER_RUNS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
              "ReqNodeNotAvail")


def parse_time(text: str) -> int:
    """A SLURM time limit ("90", "1:30:00", "2-00:00", ...) in whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if m is None:
        raise UserError(f"--time '{text}' is not a SLURM time ({TIME_FORMATS})")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is None:  # MINUTES, MM:SS or HH:MM:SS
        h, mins, s = (a, b, c) if c is not None else (0, a, b or 0)
    else:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mins, s = a, b or 0, c or 0
    total_s = ((days or 0) * 24 + h) * 3600 + mins * 60 + s
    if total_s <= 0:
        raise UserError(f"--time '{text}' must be longer than zero")
    return -(-total_s // 60)


def build_executor(opts: SubmitOptions, out_dir: str) -> submitit.AutoExecutor:
    """A submitit executor for the job: SLURM (or submitit's local executor with `local`)."""
    folder = Path(opts.folder or Path(out_dir) / rundir.SLURM)
    if not opts.local and shutil.which("sbatch") is None:
        raise UserError("sbatch not found: this is not a SLURM login node (use --local to run "
                        "the job here with submitit's local executor)")
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if opts.local else "slurm",
                                     slurm_max_num_timeout=opts.max_requeues)
    executor.update_parameters(
        **opts.submitit_copies(),
        tasks_per_node=opts.tasks,
        gpus_per_node=opts.gpus_per_node or None,  # 0: no --gpus-per-node line at all
        timeout_min=parse_time(opts.time),
        # A task that fails ends the job step, instead of leaving the other ranks blocked in a
        # collective until its timeout.
        slurm_srun_args=["--kill-on-bad-exit=1"],
        slurm_additional_parameters={"requeue": True, **opts.sbatch},
    )
    return executor


def _sbatch_error(error: Exception) -> str:
    """The `sbatch: error:` lines of a refused submission, as one line."""
    lines = [ln.strip() for ln in str(error).splitlines() if "error" in ln.lower()]
    return "; ".join(dict.fromkeys(lines)) or str(error).strip().splitlines()[-1]


def submit(cfg: Config, opts: SubmitOptions) -> submitit.Job:
    """Check the request, submit the job, print its id, log paths and how to follow it."""
    if opts.nodes < 1 or opts.tasks < 1:
        raise UserError(f"--nodes ({opts.nodes}) and tasks per node ({opts.tasks}) must be >= 1")
    if opts.local and opts.nodes > 1:
        raise UserError("--local runs on this machine only: use --nodes 1")
    world_size = opts.nodes * opts.tasks
    check_batch(cfg.train.batch_size, world_size, cfg.train.grad_accum)
    executor = build_executor(opts, cfg.out_dir)
    try:
        job = executor.submit(SlurmTrainer(cfg, opts.max_requeues))
    except submitit_utils.FailedJobError as e:
        raise UserError(f"sbatch refused the job: {_sbatch_error(e)}") from e
    if not opts.local:
        _check_can_run(job.job_id)
    stderr, stdout = job.paths.stderr, job.paths.stdout
    where = "locally" if opts.local else f"to SLURM ({opts.nodes} node(s) x {opts.tasks} task(s))"
    print(f"submitted job {job.job_id} {where}: world size {world_size}, out_dir {cfg.out_dir}")
    print(f"  training log (rank 0): {stderr}")
    print(f"  stdout (rank 0):       {stdout}")
    print(f"  follow it:             tail -F {shlex.quote(str(stderr))}")
    if not opts.local:
        print(f"  state:                 squeue -j {job.job_id}; sacct -j {job.job_id}")
        print(f"  cancel:                scancel {job.job_id}")
    return job


def submit_sweep(config_path: str | None, overrides: list[str], opts: SubmitOptions
                 ) -> list[submitit.Job]:
    """Submit every point of --sweep as one SLURM job array (at most --max-parallel running):
    point P trains in OUT_DIR/P.name as W&B run P.name of group OUT_DIR's name, each requeued
    like a single job; OUT_DIR/sweep.yaml records the points. Every point's config is checked
    before anything is submitted."""
    base = load(config_path, overrides)
    folder = Path(base.out_dir)
    points = sweeps.grid(opts.sweep)
    cfgs = [load(config_path, [*overrides, *p.overrides, f"out_dir={folder / p.name}",
                               f"tracking.name={base.tracking.name or p.name}",
                               f"tracking.group={base.tracking.group or folder.name}"])
            for p in points]
    world_size = opts.nodes * opts.tasks
    for cfg in cfgs:
        check_batch(cfg.train.batch_size, world_size, cfg.train.grad_accum)
    sweeps.check_same_points(folder, points)
    executor = build_executor(opts, str(folder))
    if opts.max_parallel:
        executor.update_parameters(slurm_array_parallelism=opts.max_parallel)
    try:
        with executor.batch():
            jobs = [executor.submit(SlurmTrainer(cfg, opts.max_requeues)) for cfg in cfgs]
    except submitit_utils.FailedJobError as e:
        raise UserError(f"sbatch refused the job array: {_sbatch_error(e)}") from e
    array = jobs[0].job_id.split("_")[0]
    sweeps.write_record(folder, {
        "config": config_path, "overrides": list(overrides), "job_array": array,
        "sweep": {k: v for k, v in opts.sweep},
        "points": [{"name": p.name, "overrides": list(p.overrides), "job": j.job_id,
                    "max_steps": c.train.max_steps} for p, j, c in zip(points, jobs, cfgs,
                                                                         strict=True)]})
    if not opts.local:
        _check_can_run(array)
    print(f"submitted job array {array}: {len(jobs)} point(s) of world size {world_size}"
          + (f", at most {opts.max_parallel} at once" if opts.max_parallel else "")
          + f"; recorded in {folder / sweeps.SWEEP_FILE}")
    for p, j in zip(points, jobs, strict=True):
        print(f"  {j.job_id}: {folder / p.name}")
    print(f"  status: ddp-diffusion sweep-status {shlex.quote(str(folder))}")
    return jobs


def _check_can_run(job_id: str, wait_s: float = 5.0) -> None:
    """Cancel and report a job that sbatch accepted but that the partition can never run."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True,
                             text=True).stdout.split()
        if len(out) < 2 or out[0] != "PENDING" or out[1] not in ("None", *NEVER_RUNS):
            return
        if out[1] in NEVER_RUNS:
            subprocess.run(["scancel", job_id], capture_output=True)
            raise UserError(f"SLURM cannot ever run this request (job {job_id} pending with "
                            f"reason {out[1]}: more nodes, CPUs, GPUs, memory or time than the "
                            "partition has, or an unknown node); cancelled it")
        time.sleep(0.5)


def job_state(job_id: str) -> str:
    """SLURM's state of a job (RUNNING, COMPLETING, ...), or UNKNOWN when it cannot be read."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True, timeout=60, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN"
    return out[0] if out else "UNKNOWN"


def _ignore(signum: int, frame: FrameType | None) -> None:
    """Stop signals after training stopped: the checkpoint is saved, we are leaving anyway."""
    log.info("ignoring %s: already stopping", signal.Signals(signum).name)


class SlurmTrainer:
    """The submitted callable: train in every task; requeue itself after a stop signal."""

    def __init__(self, cfg: Config, max_requeues: int, requeues: int = 0) -> None:
        self.cfg = cfg
        self.max_requeues = max_requeues
        self.requeues = requeues

    def __call__(self) -> int:
        """Set up torch.distributed from the job, train, and requeue when stopped by a signal."""
        dist = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True)
        logging.basicConfig(level=logging.INFO if dist.rank == 0 else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
        job = submitit.JobEnvironment()
        if dist.rank == 0:
            log.info("job %s (%s): world size %d (%d node(s)), rendezvous %s:%d; requeued %d "
                     "time(s) so far (at most %d), SLURM restart count %s", job.job_id,
                     job.cluster, dist.world_size, job.num_nodes, dist.master_addr,
                     dist.master_port, self.requeues, self.max_requeues,
                     os.environ.get("SLURM_RESTART_COUNT", "0"))
        code = train(self.cfg)
        if code != EXIT_PREEMPTED:
            return code
        for s in STOP_SIGNALS:
            signal.signal(s, _ignore)
        self._after_stop(job, dist.rank)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """What a requeued job runs: the same training, resuming from its newest checkpoint."""
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train,
                                                                      resume="auto"))
        return submitit.helpers.DelayedSubmission(
            SlurmTrainer(cfg, self.max_requeues, self.requeues + 1))

    def _save_submission(self, job: submitit.JobEnvironment) -> None:
        """Replace the job's pickled submission by `checkpoint()` (what a requeue runs)."""
        path = job.paths.submitted_pickle
        old = submitit.helpers.DelayedSubmission.load(path)
        new = self.checkpoint()
        new.set_timeout(old._timeout_min, old._timeout_countdown)
        with submitit_utils.temporary_save_path(path) as tmp:
            new.dump(tmp)

    def _after_stop(self, job: submitit.JobEnvironment, rank: int) -> NoReturn:
        """Training saved and returned 75: requeue (rank 0), or leave it to SLURM, then exit."""
        newest = checkpoint.list_checkpoints(Path(self.cfg.out_dir) / rundir.CHECKPOINTS)
        saved = f"step {newest[-1][0]} ({newest[-1][1]})" if newest else "no checkpoint"
        state = "RUNNING" if job.cluster == "local" else job_state(job.job_id)
        if state != "RUNNING":
            if rank == 0:
                self._save_submission(job)
                log.warning("job %s: stopped by a signal, saved %s; SLURM is ending the job "
                            "(state %s): it comes back and resumes if SLURM requeues it "
                            "(scontrol requeue, preemption), not if it was cancelled or hit "
                            "its time limit", job.job_id, saved, state)
            sys.exit(EXIT_PREEMPTED)  # no result file: the job is not done
        if self.requeues >= self.max_requeues:
            message = (f"job {job.job_id}: stopped by a signal, saved {saved}; NOT requeued: "
                       f"it already requeued itself {self.requeues} time(s) (max_requeues "
                       f"{self.max_requeues}); submit again with out_dir={self.cfg.out_dir} "
                       "to continue")
            log.error("%s", message)
            raise RequeueLimitReached(message)
        if rank == 0:
            self._save_submission(job)
            log.warning("job %s: stopped by a signal while still RUNNING (time-limit warning, "
                        "preemption notice or submitit interrupt), saved %s; requeueing it "
                        "(requeue %d of at most %d); it resumes from that checkpoint",
                        job.job_id, saved, self.requeues + 1, self.max_requeues)
            try:
                job._requeue(self.max_requeues - self.requeues - 1)  # local executor: exits here
            except subprocess.CalledProcessError as e:
                raise RuntimeError(f"job {job.job_id}: scontrol requeue failed ({e}); submit "
                                   f"again with out_dir={self.cfg.out_dir} to continue") from e
        sys.exit(EXIT_PREEMPTED)
