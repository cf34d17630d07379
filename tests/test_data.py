"""Data: the real torchvision loader on IDX files, Debian preparation, deterministic batches."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEBIAN_DIR, make_dataset, synthetic_split

from ddp_diffusion.config import check_batch
from ddp_diffusion.data import MemoryLoader, StepPlan
from ddp_diffusion.errors import UserError
from ddp_diffusion.sources import RAW_FILES, fit, load_split, prepare, raw_dir


def test_idx_files_round_trip_through_torchvision(tiny_data: Path) -> None:
    images, labels = load_split(tiny_data, train=True)
    want_images, want_labels = synthetic_split(160, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (160, 28, 28)
    assert torch.equal(images, torch.from_numpy(want_images))
    assert torch.equal(labels, torch.from_numpy(want_labels).long())
    test_images, _ = load_split(tiny_data, train=False)
    assert test_images.shape == (40, 28, 28)


def test_prepare_from_debian_style_gz_folder(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    debian = tmp_path / "debian"
    debian.mkdir()
    for name in RAW_FILES:  # Debian ships the four files gzipped in one flat folder
        with (raw_dir(src) / name).open("rb") as f, gzip.open(debian / f"{name}.gz", "wb") as g:
            shutil.copyfileobj(f, g)
    root = tmp_path / "root"
    images, labels = load_split(root, train=True, debian_dir=debian)
    assert sorted(p.name for p in raw_dir(root).iterdir()) == sorted(RAW_FILES)
    assert torch.equal(images, torch.from_numpy(synthetic_split(160, seed=0)[0]))
    assert labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_missing_dataset_names_both_remedies(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        prepare(tmp_path / "none", tmp_path / "no-debian", download=False)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg
    assert "\n" not in msg


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist is not "
                    "installed (make test installs it when run as root)")
def test_real_debian_fashion_mnist(tmp_path: Path) -> None:
    train_x, train_y = load_split(tmp_path, train=True, debian_dir=DEBIAN_DIR)
    test_x, test_y = load_split(tmp_path, train=False, debian_dir=DEBIAN_DIR)
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert torch.bincount(train_y).tolist() == [6000] * 10
    assert torch.bincount(test_y).tolist() == [1000] * 10


def test_fashion_mnist_is_padded_to_the_model_size_and_scaled_to_unit_range() -> None:
    x = torch.tensor([[[0, 255], [128, 0]]], dtype=torch.uint8).repeat(1, 14, 14)  # 28x28
    padded = fit(x[None], 32)
    assert padded.shape == (1, 1, 32, 32) and padded.dtype == torch.uint8
    assert torch.all(padded[..., :2, :] == 0) and torch.all(padded[..., :, -2:] == 0)
    assert padded[0, 0, 2, 3].item() == 255  # pixel (0, 1) moved by the 2-pixel border
    (batch,) = MemoryLoader(padded, torch.zeros(1, dtype=torch.long),
                            StepPlan(1, 1, 0, torch.device("cpu")), 0, 1, 1, 1000,
                            0.0).micro_batches(0)
    assert batch.x0.min() == -1.0 and batch.x0.max() == 1.0  # background -1, as the model sees


def _loader(rank: int = 0, world: int = 1, accum: int = 1, n: int = 100, batch: int = 8,
            hflip: bool = False) -> MemoryLoader:
    """Image i is filled with the value i, so a batch tells which images it holds."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 4, 4).clone()
    images[:, :, :, 0] = 255  # a bright left column shows a flip
    plan = StepPlan(n, batch, seed=0, device=torch.device("cpu"), hflip=hflip)
    return MemoryLoader(images, torch.arange(n) % 10, plan, rank, world, accum, 1000, 0.5)


def _indices(x0: torch.Tensor) -> list[int]:
    return ((x0[:, 0, 1, 1] + 1) * 127.5).round().long().tolist()


FIELDS = ("x0", "labels", "t", "noise", "drop", "keys")


def test_batches_are_deterministic_and_world_size_invariant() -> None:
    (full,) = _loader().micro_batches(17)
    (again,) = _loader().micro_batches(17)
    for field in FIELDS:
        assert torch.equal(getattr(full, field), getattr(again, field))
    # 2 ranks x 2 micro-steps: the four slices put back together are the global batch.
    parts = [mb for r in range(2) for mb in _loader(r, 2, 2).micro_batches(17)]
    assert all(len(p.labels) == 2 for p in parts)
    for field in FIELDS:
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(full, field))
    (other,) = _loader().micro_batches(18)
    assert not torch.equal(other.noise, full.noise)


def test_flips_are_drawn_per_sample_and_leave_the_other_draws_alone() -> None:
    (plain,) = _loader().micro_batches(5)
    (flipped,) = _loader(hflip=True).micro_batches(5)
    left_bright = flipped.x0[:, 0, 0, 0] == 1.0
    assert 0 < int(left_bright.sum()) < 8  # some flipped, some not (8 draws of p = 0.5)
    assert torch.equal(flipped.x0[left_bright], plain.x0[left_bright])
    assert torch.equal(flipped.x0[~left_bright], plain.x0[~left_bright].flip(-1))
    for field in ("labels", "t", "noise", "drop", "keys"):  # drawn before the flips
        assert torch.equal(getattr(flipped, field), getattr(plain, field))
    halves = [mb.x0 for r in range(2) for mb in _loader(r, 2, hflip=True).micro_batches(5)]
    assert torch.equal(torch.cat(halves), flipped.x0)  # the same flips at any world size


def test_epochs_cover_the_data_without_repeats() -> None:
    loader = _loader(n=100, batch=8)  # 12 full batches per epoch, the last 4 images dropped
    assert loader.plan.steps_per_epoch == 12 and loader.plan.position(25) == (2, 1)
    first = [i for s in range(12) for i in _indices(loader.micro_batches(s)[0].x0)]
    second = [i for s in range(12, 24) for i in _indices(loader.micro_batches(s)[0].x0)]
    assert len(set(first)) == 96 and len(set(second)) == 96  # no image twice in an epoch
    assert first != second  # a new permutation each epoch


def test_batch_must_divide() -> None:
    assert check_batch(192, 2, 3) == 32
    with pytest.raises(UserError, match=r"train.batch_size=190 is not divisible by world size 4 "
                                        r"x train.grad_accum 1; choose a multiple of 4"):
        check_batch(190, 4, 1)

