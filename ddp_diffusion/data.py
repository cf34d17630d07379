"""Training batches from a source: deterministic, world-size-invariant, in memory or streamed.

The global batch of step s is a pure function of (seed, s): epoch e = s // steps_per_epoch uses
permutation(seed, e), and every random draw (timesteps, noise, label dropout, the keys of the
model's dropout masks, flips) is made for the whole global batch from a generator seeded by
(seed, s). Each rank takes its slice of the indices and of the draws, so any world size, any
number of accumulation micro-steps and any number of loader workers see the same samples and
noise, and a run resumed at step s, on any world size, continues exactly. The data order is
drawn on the CPU, the same on any device; the draws come from the training device's generator,
so a GPU draws other noise than a CPU from the same seed.

No step makes the host wait for the device: the order moves to the device once an epoch, the
stream loader's workers draw their steps' indices themselves, and pixels and labels are copied
from pinned memory without blocking.

Two loaders share this plan behind one interface, `micro_batches(step)`:
- `MemoryLoader` keeps every image on the device (right for small sets);
- `StreamLoader` reads and decodes this rank's images of each step in DataLoader workers, steps
  ahead of training, into pinned memory (sets larger than memory).
`make_loader` picks one (data.loader: auto = memory when the set fits in MEMORY_LIMIT_BYTES).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ddp_diffusion.config import Config
from ddp_diffusion.errors import UserError
from ddp_diffusion.seeds import derive_seed
from ddp_diffusion.signals import loader_worker_init
from ddp_diffusion.sources import Reader, Source, collate

log = logging.getLogger("ddp_diffusion")

MEMORY_LIMIT_BYTES = 2 * 2**30  # data.loader=auto holds a set in memory up to this size


@dataclass
class Batch:
    x0: Tensor  # (b, C, H, W) in [-1, 1]
    labels: Tensor  # (b,) int64
    t: Tensor  # (b,) int64 diffusion steps
    noise: Tensor  # (b, C, H, W)
    drop: Tensor  # (b,) bool: replace the label by the null embedding (CFG training)
    keys: Tensor  # (b,) int64: per-sample keys of the model's dropout masks

    @staticmethod
    def zeros(b: int, image_shape: tuple[int, ...], device: torch.device) -> Batch:
        """A batch of zeros of training's shapes and dtypes."""
        def z(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return Batch(z((b, *image_shape), torch.float32), z((b,), torch.long),
                     z((b,), torch.long), z((b, *image_shape), torch.float32),
                     z((b,), torch.bool), z((b,), torch.long))


BATCH_FIELDS = tuple(Batch.__dataclass_fields__)


def check_fits(batch_size: int, num_images: int) -> None:
    """A global batch no larger than the set, or a clear error."""
    if batch_size > num_images:
        raise UserError(f"train.batch_size={batch_size} exceeds the {num_images} images")


@dataclass
class Draws:
    """The random draws of one global batch (or a rank's slice of them)."""

    t: Tensor
    noise: Tensor
    drop: Tensor
    keys: Tensor
    flip: Tensor | None

    def slice(self, lo: int, hi: int) -> Draws:
        return Draws(self.t[lo:hi], self.noise[lo:hi], self.drop[lo:hi], self.keys[lo:hi],
                     None if self.flip is None else self.flip[lo:hi])


class StepPlan:
    """Which images, and which random draws, the global batch of each step has."""

    def __init__(self, num_images: int, batch_size: int, seed: int, device: torch.device,
                 hflip: bool = False) -> None:
        check_fits(batch_size, num_images)
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.device, self.hflip = device, hflip
        self.steps_per_epoch = num_images // batch_size  # drop the ragged tail of each epoch
        self._gen = torch.Generator(device=device)
        # The data order is drawn on the CPU, whatever the device: the stream loader's workers
        # draw it without a device, and a run's order does not change when it moves to a GPU.
        self._perm_gen = torch.Generator()
        self._perms: dict[int, Tensor] = {}  # the last two epochs' (the stream loader runs
        # ahead of training, across an epoch boundary)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of a global step."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> Tensor:
        """Indices into the set of the global batch of a step, on the plan's device (copied
        there once an epoch, without waiting for the device)."""
        epoch, index = self.position(step)
        if epoch not in self._perms:
            self._perm_gen.manual_seed(derive_seed(self.seed, "perm", epoch))
            perm = torch.randperm(self.num_images, generator=self._perm_gen)
            if self.device.type == "cuda":
                perm = perm.pin_memory()
            self._perms[epoch] = perm.to(self.device, non_blocking=True)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
        return self._perms[epoch][index * self.batch_size:(index + 1) * self.batch_size]

    def draws(self, step: int, image_shape: tuple[int, ...], num_timesteps: int,
              cfg_dropout: float) -> Draws:
        """Timesteps, noise, label dropout, dropout keys (and flips) of a global batch."""
        b, gen = self.batch_size, self._gen
        gen.manual_seed(derive_seed(self.seed, "noise", step))
        t = torch.randint(0, num_timesteps, (b,), generator=gen, device=self.device)
        noise = torch.randn((b, *image_shape), generator=gen, device=self.device)
        drop = torch.rand(b, generator=gen, device=self.device) < cfg_dropout
        keys = torch.randint(0, 2**31, (b,), generator=gen, device=self.device)
        flip = torch.rand(b, generator=gen, device=self.device) < 0.5 if self.hflip else None
        return Draws(t, noise, drop, keys, flip)


class _Loader:
    """What both loaders share: this rank's slice of each step, split into micro-batches."""

    def __init__(self, plan: StepPlan, image_shape: tuple[int, ...], rank: int, world_size: int,
                 accum: int, num_timesteps: int, cfg_dropout: float) -> None:
        self.plan, self.image_shape = plan, image_shape
        self.waited_s = 0.0  # time training spent waiting for this loader's images
        self.per_rank = plan.batch_size // world_size
        self.lo = rank * self.per_rank
        self.accum, self.num_timesteps, self.cfg_dropout = accum, num_timesteps, cfg_dropout

    def take_wait(self) -> float:
        """Seconds training waited for images since the last call."""
        waited, self.waited_s = self.waited_s, 0.0
        return waited

    def rank_indices(self, step: int) -> Tensor:
        return self.plan.indices(step)[self.lo:self.lo + self.per_rank]

    def assemble(self, step: int, pixels: Tensor, labels: Tensor) -> list[Batch]:
        """Micro-batches from this rank's uint8 pixels and labels of a step, with its draws."""
        d = self.plan.draws(step, self.image_shape, self.num_timesteps, self.cfg_dropout)
        d = d.slice(self.lo, self.lo + self.per_rank)
        x0 = pixels.float().div_(127.5).sub_(1.0)
        if d.flip is not None:
            x0 = torch.where(d.flip[:, None, None, None], x0.flip(-1), x0)
        full = Batch(x0, labels, d.t, d.noise, d.drop, d.keys)
        micro = self.per_rank // self.accum
        return [Batch(*(getattr(full, f)[k * micro:(k + 1) * micro] for f in BATCH_FIELDS))
                for k in range(self.accum)]


class MemoryLoader(_Loader):
    """Every image on the device as uint8; a step's images are gathered by index."""

    def __init__(self, images: Tensor, labels: Tensor, plan: StepPlan, rank: int,
                 world_size: int, accum: int, num_timesteps: int, cfg_dropout: float) -> None:
        super().__init__(plan, tuple(images.shape[1:]), rank, world_size, accum, num_timesteps,
                         cfg_dropout)
        self.images, self.labels = images.to(plan.device), labels.to(plan.device)

    def micro_batches(self, step: int) -> list[Batch]:
        idx = self.rank_indices(step)
        return self.assemble(step, self.images[idx], self.labels[idx])


class StreamLoader(_Loader):
    """This rank's images of each step, read by DataLoader workers from `start_step` on."""

    def __init__(self, source: Source, plan: StepPlan, rank: int, world_size: int, accum: int,
                 num_timesteps: int, cfg_dropout: float, start_step: int, max_steps: int,
                 num_workers: int) -> None:
        super().__init__(plan, (source.channels, source.image_size, source.image_size), rank,
                         world_size, accum, num_timesteps, cfg_dropout)
        self.next_step = start_step
        # The workers draw each step's indices themselves, from a CPU copy of the plan: the
        # training process hands them a step number and never reads a tensor back for it.
        steps = StepImages(source, StepPlan(plan.num_images, plan.batch_size, plan.seed,
                                            torch.device("cpu")), self.lo, self.per_rank)
        loader = DataLoader(steps, sampler=range(start_step, max_steps), batch_size=None,
                            num_workers=num_workers, pin_memory=plan.device.type == "cuda",
                            prefetch_factor=4 if num_workers else None,
                            worker_init_fn=loader_worker_init)
        self._batches = iter(loader)

    def micro_batches(self, step: int) -> list[Batch]:
        if step != self.next_step:
            raise RuntimeError(f"stream loader asked for step {step}, expected {self.next_step}")
        self.next_step += 1
        t0 = time.perf_counter()
        item = next(self._batches)
        self.waited_s += time.perf_counter() - t0
        if isinstance(item, str):  # a file went bad since the check: this step fails
            raise UserError(item)
        pixels, labels = (t.to(self.plan.device, non_blocking=True) for t in item)
        return self.assemble(step, pixels, labels)


class StepImages(Dataset):
    """Item s: this rank's uint8 images and labels of step s, or the one-line error of a file
    that went bad (raised by the training process, so the user sees the line)."""

    def __init__(self, source: Source, plan: StepPlan, lo: int, per_rank: int) -> None:
        self.reader, self.labels, self.plan = Reader(source), source.labels, plan
        self.lo, self.per_rank = lo, per_rank

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor] | str:
        idx = self.plan.indices(step)[self.lo:self.lo + self.per_rank]
        pixels = collate([self.reader[i] for i in idx.tolist()])
        return pixels if isinstance(pixels, str) else (pixels, self.labels[idx])


def make_loader(source: Source, cfg: Config, rank: int, world_size: int, device: torch.device,
                start_step: int, num_timesteps: int,
                memory_limit: int = MEMORY_LIMIT_BYTES) -> MemoryLoader | StreamLoader:
    """The configured loader of a source (auto: memory if the set fits in `memory_limit`)."""
    dc, tc = cfg.data, cfg.train
    kind = dc.loader
    if kind == "auto":
        kind = "memory" if source.nbytes <= memory_limit else "stream"
    plan = StepPlan(len(source), tc.batch_size, cfg.seed, device, dc.hflip)
    common = (rank, world_size, tc.grad_accum, num_timesteps, cfg.diffusion.cfg_dropout)
    log.info("data: %s, %d images (%d class(es), %d channel(s), %.0f MB at %dx%d), %s loader%s",
             source.dataset, len(source), len(source.class_names), source.channels,
             source.nbytes / 1e6, source.image_size, source.image_size, kind,
             f" with {dc.num_workers} worker(s)" if kind == "stream" else "")
    if kind == "memory":
        return MemoryLoader(source.read_all(dc.num_workers), source.labels, plan, *common)
    return StreamLoader(source, plan, *common, start_step, tc.max_steps, dc.num_workers)
