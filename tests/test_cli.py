"""The command line: sampling grids from a trained run, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_cli
from PIL import Image

from ddp_diffusion.sample import parse_classes


@pytest.fixture(scope="module")
def trained_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    run_cli("train", *TINY, f"out_dir={out}", f"data.root={tiny_data}", "train.max_steps=10")
    return out


def _grid(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sample_cli_grid_size_and_determinism(trained_run: Path, tmp_path: Path) -> None:
    args = ["sample", "--run", str(trained_run), "--classes", "sneaker,purse,t-shirt",
            "--per-class", "3", "--sampler", "ddim", "--steps", "5", "--seed", "1"]
    proc = run_cli(*args, "--out", str(tmp_path / "a.png"))
    assert f"wrote {tmp_path / 'a.png'} (3 classes x 3, step 10)" in proc.stdout
    run_cli(*args, "--out", str(tmp_path / "b.png"))
    run_cli(*args[:-1], "2", "--out", str(tmp_path / "c.png"))
    a, b, c = (_grid(tmp_path / f"{n}.png") for n in "abc")
    assert a.shape == (3 * 34 + 2, 84 + 3 * 34 + 2)
    assert np.array_equal(a, b)  # same seed, same pixels
    assert not np.array_equal(a, c)


def test_sample_uses_the_ema_weights_unless_the_run_or_a_flag_says_otherwise(
        tiny_data: Path, trained_run: Path, tmp_path: Path) -> None:
    raw_run = tmp_path / "raw"
    run_cli("train", *TINY, f"out_dir={raw_run}", f"data.root={tiny_data}", "train.max_steps=10",
            "sample.use_ema=false")
    grids = {}
    for name, run, flags in [("default", trained_run, []), ("ema", trained_run, ["--ema"]),
                             ("raw", trained_run, ["--no-ema"]), ("raw_run", raw_run, []),
                             ("raw_run_ema", raw_run, ["--ema"])]:
        run_cli("sample", "--run", str(run), "--classes", "sneaker", "--per-class", "2",
                "--steps", "3", *flags, "--out", str(tmp_path / f"{name}.png"))
        grids[name] = _grid(tmp_path / f"{name}.png")
    assert np.array_equal(grids["default"], grids["ema"])  # sample.use_ema: true by default
    assert not np.array_equal(grids["ema"], grids["raw"])
    # Both runs trained the same steps; sample.use_ema=false makes the raw weights the default.
    assert np.array_equal(grids["raw_run"], grids["raw"])
    assert np.array_equal(grids["raw_run_ema"], grids["ema"])


def test_parse_classes_accepts_both_naming_schemes() -> None:
    assert parse_classes("all") == list(range(10))
    assert parse_classes("sneaker,Bag,pants,Ankle boot,3") == [7, 8, 1, 9, 3]


@pytest.mark.parametrize(("args", "message"), [
    (["train", "train.max_step=5"], "error: unknown config key 'train.max_step'; did you mean "
                                    "'train.max_steps'?"),
    (["train", "train.max_steps=abc"], "error: config key 'train.max_steps' expects int, "
                                       "got 'abc'"),
    (["train", "train.batch_size=7", "train.grad_accum=2"],
     "error: train.batch_size=7 is not divisible by train.grad_accum=2; choose a multiple of 2"),
    (["sample", "--run", "/nonexistent", "--out", "x.png"],
     "error: run directory /nonexistent does not exist; pass the out_dir of a run"),
])
def test_errors_are_one_line(args: list[str], message: str) -> None:
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message


def test_missing_dataset_error(tmp_path: Path) -> None:
    proc = run_cli("train", *TINY, f"out_dir={tmp_path / 'r'}", f"data.root={tmp_path / 'none'}",
                   f"data.debian_dir={tmp_path / 'none'}", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: Fashion-MNIST not found in {tmp_path / 'none'}/FashionMNIST/raw or "
                    f"{tmp_path / 'none'}: install it with 'sudo apt-get install "
                    "dataset-fashion-mnist', or set data.download=true to fetch it")
