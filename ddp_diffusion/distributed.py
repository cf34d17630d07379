"""Process-group setup (torchrun variables), CPU threads, and rank agreement on stopping."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

from ddp_diffusion.errors import DDPDiffusionError, error_class

T = TypeVar("T")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_control_group: dist.ProcessGroup | None = None


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def available_cpus() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_determinism(deterministic: bool) -> None:
    """Deterministic kernels only (a run repeats bit for bit on the same GPU model and software),
    or the fastest ones: cuDNN picks its fastest algorithm per shape by timing them (autotuning),
    and some CUDA backward kernels add with atomics, in whatever order threads arrive."""
    if deterministic:
        # cuBLAS reduces in a fixed order only with a fixed workspace; read when its first
        # handle is made, so before any CUDA work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # shapes never change: tune once


def init(num_threads: int = 0, deterministic: bool = False) -> DistEnv:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK (torchrun sets them).

    nccl with one GPU per LOCAL_RANK on CUDA machines, gloo on CPU. On CPU each rank gets
    cores / local ranks threads: 2 ranks x 1 thread beat 1 rank x 2 threads here.
    """
    set_determinism(deterministic)
    global _control_group
    env = DistEnv(
        rank=_env_int("RANK", 0),
        world_size=_env_int("WORLD_SIZE", 1),
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
    )
    if torch.cuda.is_available():
        env.device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(env.device)
        # TF32 for fp32 matmuls and convolutions (deterministic too).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        threads = num_threads or max(1, available_cpus() // env.local_world_size)
        torch.set_num_threads(threads)
    if env.distributed:
        env.backend = "nccl" if env.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            timeout = datetime.timedelta(minutes=30)
            store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size,
                                               timeout=timeout))
            # torchrun --max-restarts keeps its store across restarts: without a per-attempt
            # prefix the restarted ranks read the dead ranks' gloo addresses and cannot connect.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(env.backend, store=dist.PrefixStore(f"attempt{attempt}", store),
                                    rank=env.rank, world_size=env.world_size, timeout=timeout,
                                    device_id=env.device if env.backend == "nccl" else None)
        # Control-plane collectives (stop flags, RNG states) go over gloo on the CPU, so agreeing
        # on a stop never needs a GPU stream sync of its own.
        _control_group = dist.new_group(backend="gloo") if env.backend == "nccl" else None
    return env


def shutdown() -> None:
    """Leave the process group (no-op when single-process)."""
    global _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def agree_any(flags: list[bool]) -> list[bool]:
    """Element-wise OR of boolean flags across all ranks (a cheap CPU all-reduce)."""
    if not dist.is_initialized():
        return flags
    t = torch.tensor(flags, dtype=torch.uint8)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return [bool(v) for v in t.tolist()]


def all_gather_objects(obj: object) -> list[object]:
    """Gather one picklable object from every rank (in-memory only, never read from disk)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_control_group)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def run_on_main(is_main: bool, fn: Callable[[], T]) -> T | None:
    """Run fn on rank 0 only; if it fails with one of our errors, raise that error on every
    rank, so no rank is left waiting in a collective for one that has stopped.

    Returns fn's result on rank 0 and None elsewhere. Only the error's type and message travel.
    """
    result, failure = None, None
    if is_main:
        try:
            result = fn()
        except DDPDiffusionError as e:
            failure = (type(e).__name__, str(e))
            if not dist.is_initialized():
                raise
    failure = broadcast_object(failure)
    if failure is not None:
        raise error_class(failure[0])(failure[1])
    return result


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a collective on the training backend)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (a collective on the training backend)."""
    return sum_across_ranks(t) / dist.get_world_size() if dist.is_initialized() else t


def max_across_ranks(t: torch.Tensor) -> None:
    """Element-wise maximum over ranks, in place, on the training backend: queued on the GPU
    stream with NCCL, so the host does not wait for it."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
