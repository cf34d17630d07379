"""Shared fixtures: tiny real IDX datasets written by the tests, and a CLI runner."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from ddp_diffusion import config

if TYPE_CHECKING:
    import torch

    from ddp_diffusion.train import Trainer

REPO = Path(__file__).resolve().parent.parent
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

# A model small enough that a training step takes milliseconds on one CPU core.
TINY = [
    "model.channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
    "model.attention_resolutions=[]", "diffusion.steps=100", "train.batch_size=16",
    "train.lr=1e-3", "train.log_every=5", "train.sample_every=0", "train.ckpt_every=10",
    "sample.sampler=ddim", "sample.steps=5", "sample.per_class=2", "tracking.wandb=disabled",
    "train.precision=fp32", "train.num_threads=1",
]
# The model TINY runs train, for tests that build it in the test process: TINY's model settings
# with the data's shape filled in as the trainer does (Fashion-MNIST: 10 classes, greyscale).
TINY_MODEL = config.with_data_shape(config.load(None, TINY).model, num_classes=10, channels=1)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (the MNIST format): magic, big-endian dims, raw uint8 data."""
    magic = {1: 0x0801, 3: 0x0803}[array.ndim]
    with path.open("wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 images whose brightness pattern depends on the class, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, size=(n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 * c:2 * c + 8, 4:24] += 200  # a bar whose height encodes the class
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def make_dataset(root: Path, n_train: int = 160, n_test: int = 40) -> Path:
    """Write the four uncompressed IDX files where torchvision's FashionMNIST looks."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_split(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding a tiny synthetic Fashion-MNIST (160 train, 40 test images)."""
    return make_dataset(tmp_path_factory.mktemp("tiny_data"))


def cli_env(threads: int = 1) -> dict[str, str]:
    """Environment for CLI subprocesses: quiet W&B, fixed CPU threads."""
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": str(threads),
                "PYTHONUNBUFFERED": "1"})
    return env


def run_cli(*args: str, check: bool = True, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ddp_diffusion ARGS` (extra environment: env) and return the process."""
    proc = subprocess.run([sys.executable, "-m", "ddp_diffusion", *args], capture_output=True,
                          text=True, env={**cli_env(), **(env or {})}, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def torchrun_cmd(nproc: int, *args: str, max_restarts: int = 0,
                 entry: tuple[str, ...] = ("-m", "ddp_diffusion")) -> list[str]:
    """The command line of a real torchrun launch of the trainer (or of the script `entry`,
    which wraps it) on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}", *entry, *args]


def run_torchrun(nproc: int, *args: str, max_restarts: int = 0, check: bool = True,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the trainer under real torchrun (gloo on CPU), one thread per rank."""
    proc = subprocess.run(torchrun_cmd(nproc, *args, max_restarts=max_restarts),
                          capture_output=True, text=True, env=cli_env(), cwd=REPO,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """The trainer on `nproc` processes: one plain process, or torchrun."""
    return run_torchrun(nproc, *args) if nproc > 1 else run_cli(*args)


def max_weight_diff(a: Path, b: Path) -> float:
    """The largest difference between the final weights of two runs."""
    wa, wb = final_state(a)["model"], final_state(b)["model"]
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def final_state(run_dir: Path) -> dict:
    """The newest checkpoint of a run, loaded the safe way."""
    from ddp_diffusion import checkpoint

    _, path = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    return checkpoint.read(path)


def assert_same_run(a: Path, b: Path) -> None:
    """The newest checkpoints of two runs are bitwise equal in every trained part."""
    from ddp_diffusion import checkpoint

    differences = checkpoint.training_differences(final_state(a), final_state(b))
    assert not differences, "\n".join(differences[:20])


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until metrics.jsonl records `step` (the trainer logs every step in these tests)."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}")
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        try:
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        except json.JSONDecodeError:  # caught a line half-written
            pass
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 36), mode: str = "RGB"
                ) -> Path:
    """A small image file of random blobs (format from the suffix: .png, .jpg, .webp, ...)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(size[1] // 4, size[0] // 4, channels), dtype=np.uint8)
    pixels = np.kron(pixels, np.ones((4, 4, 1), dtype=np.uint8))  # 4x4 blocks survive JPEG
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_image_folder(root: Path, per_class: int = 12, classes: tuple[str, ...] = ("cat", "dog")
                      ) -> Path:
    """One subfolder per class of mixed PNG, JPEG and WebP files, RGB with a greyscale one."""
    suffixes = (".png", ".jpg", ".webp")
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i:03d}{suffixes[i % 3]}", seed=100 * c + i,
                        mode="L" if i == 1 else "RGB")
    return root


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Make a folder a read-only bind mount of itself (root only); undone after the test."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    mounted: list[Path] = []

    def make(path: Path) -> None:
        for cmd in (["mount", "--bind", str(path), str(path)],
                    ["mount", "-o", "remount,ro,bind", str(path)]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"cannot bind-mount here: {proc.stderr.strip()}")
            if cmd[1] == "--bind":
                mounted.append(path)

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@contextlib.contextmanager
def trainer_in_process(*overrides: str) -> Iterator[Trainer]:
    """The trainer of TINY plus `overrides` in this process (one CPU rank, its run directory
    locked), for tests that drive `train_one_step` themselves; the signal handlers it installs
    are put back after."""
    from ddp_diffusion import rundir, signals
    from ddp_diffusion.distributed import DistEnv
    from ddp_diffusion.train import Trainer

    cfg = config.load(None, [*TINY, *overrides])
    handlers = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}  # StopRequest's own
    lock = rundir.RunLock(Path(cfg.out_dir))
    try:
        trainer = Trainer(cfg, DistEnv(), signals.StopRequest(), lock)
        yield trainer
        trainer.metrics.close()
    finally:
        lock.release()
        for s, handler in handlers.items():
            signal.signal(s, handler)


def set_loss_scale(scaler: torch.amp.GradScaler, scale: float) -> None:
    """Set the fp16 loss scale the way a resumed checkpoint does."""
    scaler.load_state_dict(scaler.state_dict() | {"scale": scale})
