"""Fashion-MNIST in memory, and deterministic, world-size-invariant training batches."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import FashionMNIST

from ddp_diffusion.errors import UserError

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CLASS_NAMES = tuple(FashionMNIST.classes)  # T-shirt/top, Trouser, ..., Ankle boot
SHORT_NAMES = ("t-shirt", "pants", "sweater", "dress", "coat", "sandal", "shirt", "sneaker",
               "purse", "boot")  # the code-along's names


def raw_dir(root: str | Path) -> Path:
    """Where torchvision's FashionMNIST(download=False) expects the uncompressed IDX files."""
    return Path(root) / "FashionMNIST" / "raw"


def prepare(root: str | Path, debian_dir: str | Path, download: bool) -> None:
    """Make sure the four uncompressed IDX files exist under ROOT/FashionMNIST/raw/."""
    target = raw_dir(root)
    if all((target / name).is_file() for name in RAW_FILES):
        return
    debian = Path(debian_dir)
    if all((debian / f"{name}.gz").is_file() for name in RAW_FILES):
        target.mkdir(parents=True, exist_ok=True)
        for name in RAW_FILES:
            tmp = target / f".{name}.tmp-{os.getpid()}"  # ranks may prepare concurrently
            with gzip.open(debian / f"{name}.gz", "rb") as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(target / name)  # atomic: a crash never leaves a half-written IDX file
        return
    if download:
        FashionMNIST(str(root), train=True, download=True)
        return
    raise UserError(
        f"Fashion-MNIST not found in {target} or {debian}: install it with "
        "'sudo apt-get install dataset-fashion-mnist', or set data.download=true to fetch it"
    )


def load_split(root: str | Path, train: bool, debian_dir: str | Path = "", download: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split, through torchvision's loader."""
    prepare(root, debian_dir, download)
    ds = FashionMNIST(str(root), train=train, download=False)
    return ds.data, ds.targets


def to_model_range(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, size, size) in [-1, 1], zero-padded (background = -1)."""
    x = images.unsqueeze(1).float().div_(127.5).sub_(1.0)
    pad = size - x.shape[-1]
    if pad < 0 or pad % 2:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return F.pad(x, (pad // 2,) * 4, value=-1.0)


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A short hash of a dataset's pixels and labels."""
    h = hashlib.blake2b(digest_size=16)
    for t in (images, labels):
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, stream name, step, ...): streams never overlap or correlate."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Batch:
    x0: torch.Tensor  # (b, 1, H, W) in [-1, 1]
    labels: torch.Tensor  # (b,) int64
    t: torch.Tensor  # (b,) int64 diffusion steps
    noise: torch.Tensor  # (b, 1, H, W)
    drop: torch.Tensor  # (b,) bool: replace the label by the null embedding (CFG training)
    keys: torch.Tensor  # (b,) int64: per-sample keys of the model's dropout masks


BATCH_FIELDS = tuple(Batch.__dataclass_fields__)


class InMemoryData:
    """The whole training set on the device, served as deterministic global batches.

    The global batch of step s is a pure function of (seed, s): epoch e = s // steps_per_epoch
    uses permutation(seed, e), and every random draw (timesteps, noise, label dropout, the keys
    of the model's dropout masks) is made
    for the whole global batch from a generator seeded by (seed, s). A rank takes its slice, so
    any world size and any number of accumulation micro-steps see exactly the same samples and
    noise, and resuming at step s replays exactly what an uninterrupted run does.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 device: torch.device, image_size: int = 32) -> None:
        if batch_size > len(images):
            raise UserError(f"train.batch_size={batch_size} exceeds the {len(images)} images")
        self.fingerprint = fingerprint(images, labels)
        self.images = images.to(device)  # uint8: 47 MB for the full training set
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.image_size = image_size
        self.steps_per_epoch = len(images) // batch_size  # drop the ragged tail of each epoch
        self._gen = torch.Generator(device=device)
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of a global step."""
        return divmod(step, self.steps_per_epoch)

    def state_dict(self) -> dict[str, int | str]:
        """What a checkpoint records of the data: the position is a function of the step, so
        only the source is stored, to refuse resuming on different data."""
        return {"num_images": len(self.images), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        """Check that the checkpoint was trained on this same data (format 1 did not say)."""
        if state and state != self.state_dict():
            raise UserError(
                f"the training data changed since this checkpoint ({state['num_images']} images "
                f"then, {len(self.images)} now, or different contents): resume with the data it "
                "was trained on, or start a new run (train.resume=never or a new out_dir)")

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._gen.manual_seed(derive_seed(self.seed, "perm", epoch))
            self._perm = torch.randperm(len(self.images), generator=self._gen, device=self.device)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int, num_timesteps: int, cfg_dropout: float) -> Batch:
        """The full global batch of a step, with its timesteps, noise and label-dropout mask."""
        epoch, index = self.position(step)
        idx = self._permutation(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        x0 = to_model_range(self.images[idx], self.image_size)
        self._gen.manual_seed(derive_seed(self.seed, "noise", step))
        t = torch.randint(0, num_timesteps, (self.batch_size,), generator=self._gen,
                          device=self.device)
        noise = torch.randn(x0.shape, generator=self._gen, device=self.device)
        drop = torch.rand(self.batch_size, generator=self._gen, device=self.device) < cfg_dropout
        keys = torch.randint(0, 2**31, (self.batch_size,), generator=self._gen, device=self.device)
        return Batch(x0, self.labels[idx], t, noise, drop, keys)

    def micro_batches(self, step: int, rank: int, world_size: int, accum: int,
                      num_timesteps: int, cfg_dropout: float) -> list[Batch]:
        """This rank's accumulation micro-batches of the global batch of `step`."""
        full = self.global_batch(step, num_timesteps, cfg_dropout)
        per_rank = self.batch_size // world_size
        micro = per_rank // accum
        out = []
        for k in range(accum):
            lo = rank * per_rank + k * micro
            out.append(Batch(*(getattr(full, f)[lo:lo + micro] for f in BATCH_FIELDS)))
        return out


def check_batch(batch_size: int, world_size: int, accum: int) -> int:
    """Per-rank micro-batch size, or a clear error when the global batch does not divide."""
    if batch_size % (world_size * accum):
        raise UserError(
            f"train.batch_size={batch_size} is not divisible by world size {world_size} x "
            f"train.grad_accum {accum}; choose a multiple of {world_size * accum}"
        )
    return batch_size // (world_size * accum)
