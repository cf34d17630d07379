"""Data: the real torchvision loader on IDX files, Debian preparation, batches, errors."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEBIAN_DIR, make_dataset, synthetic_split, write_idx

from ddp_diffusion.data import (
    RAW_FILES,
    InMemoryData,
    check_batch,
    load_split,
    prepare,
    raw_dir,
    to_model_range,
)
from ddp_diffusion.errors import UserError


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


def test_model_range_and_padding() -> None:
    x = torch.tensor([[[0, 255], [128, 0]]], dtype=torch.uint8).repeat(1, 14, 14)  # 28x28
    y = to_model_range(x)
    assert y.shape == (1, 1, 32, 32)
    assert y.min() == -1.0 and y.max() == 1.0
    assert torch.all(y[..., :2, :] == -1.0) and torch.all(y[..., :, -2:] == -1.0)
    assert y[0, 0, 2, 3].item() == 1.0  # pixel (0, 1) = 255 moved by the 2-pixel border


def _data(seed: int = 0, n: int = 100, batch: int = 8) -> InMemoryData:
    """Image i is filled with the value i, so a batch tells which images it holds."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None].expand(n, 28, 28).clone()
    return InMemoryData(images, torch.arange(n) % 10, batch, seed, torch.device("cpu"))


def _indices(x0: torch.Tensor) -> list[int]:
    return ((x0[:, 0, 16, 16] + 1) * 127.5).round().long().tolist()


def test_batches_are_deterministic_and_world_size_invariant() -> None:
    data = _data()
    full = data.global_batch(17, num_timesteps=1000, cfg_dropout=0.5)
    again = _data().global_batch(17, num_timesteps=1000, cfg_dropout=0.5)
    for field in ("x0", "labels", "t", "noise", "drop"):
        assert torch.equal(getattr(full, field), getattr(again, field))
    # 2 ranks x 2 micro-steps: the four slices put back together are the global batch.
    parts = [mb for r in range(2) for mb in data.micro_batches(17, r, 2, 2, 1000, 0.5)]
    assert all(len(p.labels) == 2 for p in parts)
    for field in ("x0", "labels", "t", "noise", "drop"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(full, field))
    other = data.global_batch(18, 1000, 0.5)
    assert not torch.equal(other.noise, full.noise)


def test_epochs_cover_the_data_without_repeats() -> None:
    data = _data(n=100, batch=8)  # 12 full batches per epoch, the last 4 images dropped
    assert data.steps_per_epoch == 12 and data.position(25) == (2, 1)
    first = [i for s in range(12) for i in _indices(data.global_batch(s, 1000, 0.0).x0)]
    second = [i for s in range(12, 24) for i in _indices(data.global_batch(s, 1000, 0.0).x0)]
    assert len(set(first)) == 96 and len(set(second)) == 96  # no image twice in an epoch
    assert first != second  # a new permutation each epoch


def test_batch_must_divide() -> None:
    assert check_batch(192, 2, 3) == 32
    with pytest.raises(UserError, match=r"train.batch_size=190 is not divisible by world size 4 "
                                        r"x train.grad_accum 1; choose a multiple of 4"):
        check_batch(190, 4, 1)


def test_write_idx_header(tmp_path: Path) -> None:
    write_idx(tmp_path / "x", np.zeros((3, 28, 28), dtype=np.uint8))
    head = (tmp_path / "x").read_bytes()[:16]
    assert head == bytes.fromhex("00000803" "00000003" "0000001c" "0000001c")
