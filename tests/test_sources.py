"""Sources and loaders on real files: image folders (PNG, JPEG, WebP, RGB and greyscale, broken
files), torchvision's MNIST and CIFAR-10 layouts, and the stream loader against the memory
loader."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    TINY,
    assert_same_run,
    cli_env,
    final_state,
    launch,
    make_dataset,
    make_image_folder,
    max_weight_diff,
    run_cli,
    run_torchrun,
    synthetic_split,
    torchrun_cmd,
    wait_for_step,
    write_idx,
    write_image,
)
from PIL import Image

from ddp_diffusion import checkpoint
from ddp_diffusion.config import Config, DataConfig, TrainConfig
from ddp_diffusion.data import MemoryLoader, StepPlan, StreamLoader, make_loader
from ddp_diffusion.errors import UserError
from ddp_diffusion.sources import decode, open_source


def folder_config(path: Path, root: Path, **kw: object) -> DataConfig:
    return DataConfig(**{"dataset": "image_folder", "path": str(path), "root": str(root),
                         "num_workers": 2, **kw})


def test_a_class_folder_gives_sorted_labels_rgb_channels_and_fitted_images(tmp_path: Path
                                                                           ) -> None:
    folder = make_image_folder(tmp_path / "pets", per_class=5, classes=("dog", "cat"))
    source = open_source(folder_config(folder, tmp_path / "data"), image_size=16, num_workers=2)
    assert source.class_names == ("cat", "dog")  # sorted folder names
    assert source.labels.tolist() == [0] * 5 + [1] * 5
    assert source.channels == 3  # one image in colour makes the set RGB
    images = source.read_all(num_workers=2)
    assert images.shape == (10, 3, 16, 16) and images.dtype == torch.uint8
    grey = source.files.index(folder / "cat" / "001.jpg")  # the greyscale file
    assert torch.equal(images[grey][0], images[grey][1]) and torch.equal(images[grey][1],
                                                                          images[grey][2])
    assert torch.equal(source.read(3), images[3])
    state = source.state_dict()
    assert state["dataset"] == "image_folder" and state["num_images"] == 10
    assert state["class_names"] == ["cat", "dog"] and len(state["fingerprint"]) == 32


def test_images_are_resized_on_the_shorter_side_then_centre_cropped(tmp_path: Path) -> None:
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)  # 96 wide: resized to 48x32, then the
    pixels[:, :8, 0] = 255  # centre 32 columns are kept; a red left border and
    pixels[:, 8:88, 1] = 255  # a blue right one fall outside them
    pixels[:, 88:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = decode(tmp_path / "wide.png", channels=3, size=32)
    assert out.shape == (3, 32, 32)
    assert out[1].min() >= 250 and out[0].max() <= 5 and out[2].max() <= 5  # only the centre


def test_a_folder_of_greyscale_images_directly_is_an_unconditional_greyscale_set(
        tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "faces" / f"{i}.png", seed=i, mode="L")
    source = open_source(folder_config(tmp_path / "faces", tmp_path / "data"), 16, 0)
    assert source.channels == 1 and source.class_names == ("all",)
    assert source.labels.tolist() == [0, 0, 0, 0]
    unconditional = open_source(folder_config(make_image_folder(tmp_path / "pets", 2),
                                              tmp_path / "data", class_conditional=False), 16, 0)
    assert unconditional.class_names == ("all",) and unconditional.labels.tolist() == [0] * 4


def test_bad_folders_and_files_are_one_line_naming_them(tmp_path: Path) -> None:
    data = tmp_path / "data"

    def error(folder: Path, **kw: object) -> str:
        with pytest.raises(UserError) as e:
            open_source(folder_config(folder, data, **kw), 16, 2)
        assert "\n" not in str(e.value)
        return str(e.value)

    (tmp_path / "empty").mkdir()
    assert error(tmp_path / "empty").startswith(f"{tmp_path / 'empty'} has no images (.png, ")
    pets = make_image_folder(tmp_path / "pets", per_class=3)
    (pets / "bird").mkdir()
    assert error(pets).startswith(f"class folder {pets / 'bird'} has no images (.png, ")
    (pets / "bird").rmdir()
    write_image(pets / "stray.png", seed=9)
    assert error(pets) == (f"{pets} holds class folders and also images (stray.png, ...): move "
                           "the images into a class folder")
    (pets / "stray.png").unlink()
    jpg = pets / "dog" / "001.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])  # truncated mid-image
    assert error(pets).startswith(f"{jpg}: unreadable image (")
    jpg.write_bytes(b"this is not an image")
    assert error(pets).startswith(f"{jpg}: unreadable image (cannot identify image file")
    write_image(jpg, seed=1)
    lab = pets / "dog" / "lab.tif"
    Image.new("LAB", (8, 8)).save(lab)
    assert error(pets, channels=1) == (
        f"{lab}: cannot convert its mode LAB to greyscale (conversion from LAB to RGB not "
        "supported); convert or remove the file")
    assert error(tmp_path / "missing") == (f"data.path {tmp_path / 'missing'} is not a folder of "
                                           "images")


def test_the_check_of_a_folder_is_cached_by_its_content(tmp_path: Path) -> None:
    pets = make_image_folder(tmp_path / "pets", per_class=2)
    cfg = folder_config(pets, tmp_path / "data")
    checked = tmp_path / "data" / "checked"
    first = open_source(cfg, 16, 0)
    assert [p.name.startswith(first.content) for p in sorted(checked.glob("[!d]*"))] == [True]
    write_image(pets / "cat" / "new.png", seed=5)  # another file: another fingerprint, a check
    second = open_source(cfg, 16, 0)
    assert second.fingerprint != first.fingerprint and len(second) == len(first) + 1
    png = pets / "cat" / "000.png"
    size = png.stat().st_size
    Image.fromarray(255 - np.asarray(Image.open(png))).save(png)  # edited in place: same size
    assert png.stat().st_size == size
    third = open_source(cfg, 16, 0)
    assert third.fingerprint == second.fingerprint and third.content != second.content
    assert len(list(checked.glob("[!d]*"))) == 3  # each state of the folder checked once
    (digests,) = checked.glob("digests-*.json")
    stamp = os.stat(png)
    assert json.loads(digests.read_text())["cat/000.png"][:3] == [
        stamp.st_ino, stamp.st_size, stamp.st_mtime_ns]


def test_16_bit_and_float_images_are_scaled_over_their_range_not_clipped(tmp_path: Path
                                                                          ) -> None:
    ramp = np.tile(np.arange(16), (16, 1))  # 16 columns, 0..15
    Image.fromarray((ramp * 4369).astype(np.uint16)).save(tmp_path / "wide.png")  # 0..65535
    Image.fromarray((ramp / 15).astype(np.float32), "F").save(tmp_path / "float.tif")  # 0..1
    expected = torch.from_numpy(ramp * 17).to(torch.uint8)  # 0..255
    for name in ("wide.png", "float.tif"):
        for channels in (1, 3):
            pixels = decode(tmp_path / name, channels, 16)
            assert pixels.shape == (channels, 16, 16)
            assert torch.equal(pixels, expected.expand(channels, 16, 16)), name
    Image.fromarray((ramp * 2.0).astype(np.float32), "F").save(tmp_path / "hdr.tif")
    with pytest.raises(UserError) as e:
        decode(tmp_path / "hdr.tif", 1, 16)
    assert str(e.value) == (f"{tmp_path / 'hdr.tif'}: a F image with values 0..30, outside 0..1; "
                            "save it as 8- or 16-bit, or scale it to 0..1")


def test_a_decompression_bomb_is_one_line_in_a_greyscale_or_colour_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # so that a 64x64 image is a bomb
    for mode in ("L", "RGB"):
        folder = tmp_path / mode / "pets"
        for i in range(3):
            write_image(folder / "cat" / f"{i}.png", seed=i, size=(16, 16), mode=mode)
        bomb = write_image(folder / "cat" / "bomb.png", seed=9, size=(64, 64), mode=mode)
        with pytest.raises(UserError) as e:
            open_source(folder_config(folder, tmp_path / mode / "data"), 16, 2)
        assert str(e.value).startswith(f"{bomb}: too many pixels to open safely (Image size "
                                       "(4096 pixels) exceeds limit of 2000 pixels")
        assert str(e.value).endswith("; shrink or remove the file")


def test_a_read_only_data_root_is_used_without_its_caches(
        tmp_path: Path, read_only: Callable[[Path], None]) -> None:
    pets = make_image_folder(tmp_path / "pets", per_class=2)
    (tmp_path / "data").mkdir()
    read_only(tmp_path / "data")
    source = open_source(folder_config(pets, tmp_path / "data"), 16, 0)
    assert len(source) == 4 and source.content is not None
    assert not list((tmp_path / "data").iterdir())

    debian = tmp_path / "debian"  # Debian's package: gzipped IDX files, uncompressed into root
    debian.mkdir()
    for raw in (make_dataset(tmp_path / "idx") / "FashionMNIST" / "raw").iterdir():
        (debian / f"{raw.name}.gz").write_bytes(gzip.compress(raw.read_bytes()))
    with pytest.raises(UserError) as e:
        open_source(DataConfig(root=str(tmp_path / "data"), debian_dir=str(debian)), 32)
    target = tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    assert re.fullmatch(rf"could not write {re.escape(str(target))} \(Read-only file system; "
                        r"[\d.]+ MiB free there\): Fashion-MNIST is uncompressed into data.root "
                        "once; set data.root to a folder you can write", str(e.value))


def test_mnist_from_idx_files_and_a_missing_cifar10_is_one_line(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", 20, 0), ("t10k", 10, 1)):
        images, labels = synthetic_split(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    mnist = open_source(DataConfig(dataset="mnist", root=str(tmp_path)), 32)
    assert len(mnist) == 20 and mnist.channels == 1 and mnist.class_names[0] == "0 - zero"
    assert torch.equal(mnist.read(0)[0, 2:30, 2:30],
                       torch.from_numpy(synthetic_split(20, 0)[0][0]))  # padded 28 -> 32
    with pytest.raises(UserError) as e:
        open_source(DataConfig(dataset="cifar10", root=str(tmp_path)), 32)
    assert str(e.value) == (f"cifar10 not found in {tmp_path / 'cifar-10-batches-py'}: put the "
                            "CIFAR-10 python batches there, or set data.download=true to fetch it")


def test_auto_holds_a_set_in_memory_up_to_the_limit_and_streams_a_larger_one(tmp_path: Path
                                                                            ) -> None:
    pets = make_image_folder(tmp_path / "pets", per_class=4)
    source = open_source(folder_config(pets, tmp_path / "data"), 16, 0)
    assert source.nbytes == 8 * 3 * 16 * 16
    cfg = Config(data=folder_config(pets, tmp_path / "data", num_workers=0),
                 train=TrainConfig(batch_size=4, max_steps=2))
    chosen = [make_loader(source, cfg, 0, 1, torch.device("cpu"), 0, 100, memory_limit=limit)
              for limit in (source.nbytes, source.nbytes - 1)]
    assert [type(loader) for loader in chosen] == [MemoryLoader, StreamLoader]


def test_an_offline_download_is_one_line_saying_where_the_files_go(tmp_path: Path) -> None:
    from torchvision.datasets import MNIST

    mirrors = MNIST.mirrors
    MNIST.mirrors = ["http://127.0.0.1:9/"]  # nothing listens there: every download fails
    try:
        with pytest.raises(UserError) as e:
            open_source(DataConfig(dataset="mnist", root=str(tmp_path), download=True), 32)
    finally:
        MNIST.mirrors = mirrors
    assert str(e.value).startswith("could not download mnist (RuntimeError: ")
    assert str(e.value).endswith(f"put its files in {tmp_path / 'MNIST' / 'raw'} yourself, or "
                                 "try again where there is internet")


@pytest.mark.parametrize("hflip", [False, True])
def test_the_stream_loader_gives_the_memory_loader_s_batches_bit_for_bit(tmp_path: Path,
                                                                         hflip: bool) -> None:
    pets = make_image_folder(tmp_path / "pets", per_class=10)  # 20 images, 5 steps an epoch
    source = open_source(folder_config(pets, tmp_path / "data"), 16, 2)
    for rank in range(2):  # each rank of 2, 2 micro-batches each, from a mid-epoch step on
        common = (rank, 2, 2, 1000, 0.3)
        memory = MemoryLoader(source.read_all(2), source.labels,
                              StepPlan(len(source), 4, 7, torch.device("cpu"), hflip), *common)
        stream = StreamLoader(source, StepPlan(len(source), 4, 7, torch.device("cpu"), hflip),
                              *common, start_step=3, max_steps=12, num_workers=2)
        for step in range(3, 12):  # crosses two epoch boundaries
            for a, b in zip(memory.micro_batches(step), stream.micro_batches(step), strict=True):
                for field in ("x0", "labels", "t", "noise", "drop", "keys"):
                    assert torch.equal(getattr(a, field), getattr(b, field)), (step, field)
        with pytest.raises(RuntimeError, match="asked for step 3, expected 12"):
            stream.micro_batches(3)


def test_a_file_that_goes_bad_after_the_check_fails_its_step_with_one_line(tmp_path: Path
                                                                          ) -> None:
    pets = make_image_folder(tmp_path / "pets", per_class=4)
    source = open_source(folder_config(pets, tmp_path / "data"), 16, 2)
    bad = pets / "cat" / "000.png"
    size = bad.stat().st_size
    bad.write_bytes(os.urandom(size))  # same size: the cached check does not notice
    loader = StreamLoader(source, StepPlan(len(source), 8, 0, torch.device("cpu")), 0, 1, 1,
                          1000, 0.1, start_step=0, max_steps=1, num_workers=2)
    with pytest.raises(UserError, match=rf"^{bad}: unreadable image \("):
        loader.micro_batches(0)  # one batch of 8 covers every image


# ----------------------------------------------------------------------------- real training


def folder_args(data: Path, folder: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """A tiny run on an image folder: 24 images, 3 steps an epoch, every step logged."""
    return ["train", *TINY, "data.dataset=image_folder", f"data.path={folder}",
            f"data.root={data}", f"out_dir={out}", f"train.max_steps={steps}",
            "train.batch_size=8", "train.log_every=1", "train.ckpt_every=1000", *extra]


STREAM = ("data.loader=stream", "data.num_workers=2", "data.hflip=true")


@pytest.fixture(scope="module")
def pets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder") / "pets", per_class=12)


def test_training_on_an_image_folder_draws_rgb_grids_with_its_class_names(
        pets: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(*folder_args(tmp_path / "data", pets, out, 4, "train.sample_every=4"))
    state = final_state(out)
    assert state["config"]["model"]["in_channels"] == 3
    assert state["config"]["model"]["num_classes"] == 2
    assert state["data"]["class_names"] == ["cat", "dog"] and state["data"]["num_images"] == 24
    grid = Image.open(out / "samples" / "step-00000004.png")
    assert grid.mode == "RGB" and grid.size == (84 + 2 * 34 + 2, 2 * 34 + 2)  # cat, dog rows
    proc = run_cli("sample", "--run", str(out), "--classes", "dog", "--per-class", "3",
                   "--steps", "3", "--out", str(tmp_path / "dog.png"))
    assert "(1 classes x 3, step 4)" in proc.stdout
    bad = run_cli("sample", "--run", str(out), "--classes", "sneaker", "--out", "x.png",
                  check=False)
    assert bad.stderr == "error: unknown class 'sneaker'; use one of: all, cat, dog (or 0..1)\n"


def test_a_broken_image_stops_the_run_before_any_work(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "pets", per_class=3)
    broken = folder / "dog" / "002.webp"
    broken.write_bytes(broken.read_bytes()[:60])
    out = tmp_path / "run"
    proc = run_cli(*folder_args(tmp_path / "data", folder, out, 4), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {broken}: unreadable image (")
    assert not out.exists()


def test_resuming_on_a_changed_folder_is_refused(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "pets", per_class=4)
    out = tmp_path / "run"
    run_cli(*folder_args(tmp_path / "data", folder, out, 2))
    write_image(folder / "cat" / "extra.png", seed=77)
    proc = run_cli(*folder_args(tmp_path / "data", folder, out, 4), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: the training data changed since this checkpoint (image_folder {folder}, 8 "
        f"images then; image_folder {folder}, 9 images now; num_images, fingerprint, content "
        "differ)")
    (folder / "cat" / "extra.png").unlink()
    png = next((folder / "dog").glob("*.png"))
    size = png.stat().st_size
    Image.fromarray(255 - np.asarray(Image.open(png))).save(png)  # edited in place, same size
    assert png.stat().st_size == size
    proc = run_cli(*folder_args(tmp_path / "data", folder, out, 4), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: the training data changed since this checkpoint (image_folder {folder}, 8 "
        f"images then; image_folder {folder}, 8 images now; content differ)")


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_stream_loader_with_workers_resumes_mid_epoch_exactly_after_sigterm(
        pets: Path, tmp_path: Path, ranks: int) -> None:
    data = tmp_path / "data"
    # One image a rank a step: 24 images are 12 steps an epoch on 2 ranks and 8 on 3.
    args = (*STREAM, f"train.batch_size={ranks}")
    run_torchrun(ranks, *folder_args(data, pets, tmp_path / "straight", 20, *args))
    out = tmp_path / "stopped"
    launcher = subprocess.Popen(torchrun_cmd(ranks, *folder_args(data, pets, out, 20, *args)),
                                cwd=REPO, env=cli_env(), stderr=subprocess.PIPE, text=True)
    wait_for_step(out / "metrics.jsonl", 4, launcher)
    pids = sorted(int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)],
                                                 capture_output=True, text=True).stdout.split())
    os.kill(pids[-1], signal.SIGTERM)  # one rank hears it
    _, err = launcher.communicate(timeout=300)
    assert err.count("exitcode  : 75") == ranks, err[-3000:]
    ((stopped_at, _),) = checkpoint.list_checkpoints(out / "checkpoints")
    assert 4 <= stopped_at < 24 // ranks  # mid-epoch; the resumed run then crosses epochs
    run_torchrun(ranks, *folder_args(data, pets, out, 20, *args))
    assert_same_run(tmp_path / "straight", out)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, as SLURM's process tracking sees a job step's."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [d for c in map(int, children.stdout.split()) for d in (c, *descendants(c))]


@pytest.mark.slow
def test_sigterm_to_every_process_of_a_stream_run_saves_and_resumes_exactly(
        pets: Path, tmp_path: Path) -> None:
    """What SLURM does on scancel, preemption and time limit: SIGTERM to every process of the
    job step, the torchrun agent and the loader workers included (they used to die of it and
    fail the step before anything was saved)."""
    data = tmp_path / "data"
    args = (*STREAM, "train.batch_size=2")
    run_torchrun(2, *folder_args(data, pets, tmp_path / "straight", 20, *args))
    out = tmp_path / "stopped"
    launcher = subprocess.Popen(torchrun_cmd(2, *folder_args(data, pets, out, 20, *args)),
                                cwd=REPO, env=cli_env(), stderr=subprocess.PIPE, text=True)
    wait_for_step(out / "metrics.jsonl", 4, launcher)
    job = descendants(launcher.pid)  # torchrun starts each rank in a process group of its own
    assert len(job) >= 2 + 2 * 2, job  # ranks and their workers
    for pid in [launcher.pid, *job]:
        os.kill(pid, signal.SIGTERM)
    _, err = launcher.communicate(timeout=300)
    assert "killed by signal" not in err, err[-3000:]  # no worker died of it
    assert "stopped by SIGTERM" in err, err[-3000:]
    ((stopped_at, _),) = checkpoint.list_checkpoints(out / "checkpoints")
    assert 4 <= stopped_at < 20
    run_torchrun(2, *folder_args(data, pets, out, 20, *args))
    assert_same_run(tmp_path / "straight", out)


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_stream_loader_resumes_on_another_world_size(pets: Path, tmp_path: Path, before: int,
                                                     after: int) -> None:
    data = tmp_path / "data"
    launch(before, *folder_args(data, pets, tmp_path / "straight", 7, *STREAM))
    launch(before, *folder_args(data, pets, tmp_path / "run", 4, *STREAM))
    launch(after, *folder_args(data, pets, tmp_path / "run", 7, *STREAM))
    assert final_state(tmp_path / "run")["world_size"] == after
    diff = max_weight_diff(tmp_path / "straight", tmp_path / "run")
    assert diff < 1e-5, diff
