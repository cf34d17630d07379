"""The command line: sampling grids from a trained run, and one-line errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY, cli_env, run_cli
from PIL import Image

from ddp_diffusion.cli import build_parser
from ddp_diffusion.registry import DATASETS, MODELS, SAMPLERS
from ddp_diffusion.sample import parse_classes
from ddp_diffusion.submit_options import SubmitOptions, from_args


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


def test_a_grid_of_one_batch_is_the_one_batch_grid_as_before(trained_run: Path,
                                                              tmp_path: Path) -> None:
    """Up to --batch-size images are one generate() call, drawn into the grid make_grid drew."""
    import torch
    from torchvision.utils import make_grid

    from ddp_diffusion.runs import load_run
    from ddp_diffusion.sample import LABEL_WIDTH, generate

    out = tmp_path / "grid.png"
    run_cli("sample", "--run", str(trained_run), "--classes", "1,7", "--per-class", "3",
            "--sampler", "ddim", "--steps", "5", "--seed", "3", "--out", str(out))
    run = load_run(trained_run, None, None, torch.device("cpu"))
    images = generate(run.denoiser, run.diffusion, torch.tensor([1, 1, 1, 7, 7, 7]), "ddim", 5,
                      run.cfg.sample.guidance, seed=3, image_size=32, channels=1)
    expected = (make_grid((images + 1) / 2, nrow=3, padding=2, pad_value=1.0) * 255).round()
    assert np.array_equal(_grid(out)[:, LABEL_WIDTH:], expected.byte()[0].numpy())


def _peak_rss_mib(*args: str) -> float:
    """The peak resident memory of a CLI process (MiB), which prints it as its last line."""
    code = ("import resource, sys; from ddp_diffusion.cli import main; rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.splitlines()[-1]) / 1024


def test_a_large_grid_is_generated_in_chunks_with_flat_memory(trained_run: Path,
                                                               tmp_path: Path) -> None:
    args = ["sample", "--run", str(trained_run), "--sampler", "ddim", "--steps", "1",
            "--batch-size", "20"]
    small = _peak_rss_mib(*args, "--per-class", "2", "--out", str(tmp_path / "small.png"))
    large = _peak_rss_mib(*args, "--per-class", "40", "--out", str(tmp_path / "large.png"))
    # 400 images in one batch hold ~300 MiB of activations; 20 at a time, ~15 MiB.
    assert large - small < 100, (small, large)
    assert _grid(tmp_path / "large.png").shape == (10 * 34 + 2, 84 + 40 * 34 + 2)


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
    (["submit", "--sbatch", "=END"], "error: --sbatch '=END' must look like KEY=VALUE or FLAG"),
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


def test_submit_flags_fill_their_submit_options() -> None:
    """The flags README documents, each read into its field; no flag given: the defaults."""
    args = build_parser().parse_args([
        "submit", "--nodes", "4", "--gpus-per-node", "8", "--tasks-per-node", "2",
        "--cpus-per-task", "6", "--partition", "gpu", "--account", "proj", "--qos", "high",
        "--time", "2-00:00:00", "--mem", "480G", "--constraint", "a100", "--exclude", "n1",
        "--job-name", "fm", "--sbatch", "mail-type=END", "--sbatch", "exclusive", "--folder",
        "logs", "--local", "--signal-delay", "60", "--max-requeues", "3", "train.max_steps=5"])
    assert from_args(args) == SubmitOptions(
        nodes=4, gpus_per_node=8, tasks_per_node=2, cpus_per_task=6, partition="gpu",
        account="proj", qos="high", time="2-00:00:00", mem="480G", constraint="a100",
        exclude="n1", job_name="fm", sbatch={"mail-type": "END", "exclusive": True},
        folder="logs", local=True, signal_delay_s=60, max_requeues=3)
    assert args.overrides == ["train.max_steps=5"]
    assert from_args(build_parser().parse_args(["submit"])) == SubmitOptions()


def test_the_sbatch_template_has_the_submit_defaults() -> None:
    """slurm/train.sbatch (plain sbatch, no submitit) asks for what `submit` asks for by default:
    the same time limit, job name, warning signal and requeue limit."""
    text = (REPO / "slurm" / "train.sbatch").read_text()
    directives = dict(line.removeprefix("#SBATCH --").partition("=")[::2]
                      for line in text.splitlines() if line.startswith("#SBATCH --"))
    opts = SubmitOptions()
    assert directives["time"] == opts.time
    assert directives["job-name"] == opts.job_name
    assert directives["signal"] == f"B:USR2@{opts.signal_delay_s}"
    assert f"MAX_REQUEUES=${{MAX_REQUEUES:-{opts.max_requeues}}}" in text


def test_the_parser_is_built_without_torch_or_submitit() -> None:
    """`ddp-diffusion --help` answers at once: importing torch alone takes seconds."""
    code = ("import sys; from ddp_diffusion.cli import build_parser; "
            "build_parser().parse_args(['submit']); "
            "print(sorted({'torch', 'submitit'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, check=True)
    assert proc.stdout.strip() == "[]"
def test_the_sampler_flags_and_train_help_come_from_the_registry() -> None:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command in ("sample", "fid"):
        (flag,) = [a for a in commands.choices[command]._actions if a.dest == "sampler"]
        assert list(flag.choices) == list(SAMPLERS), command
    lines = commands.choices["train"].format_help().splitlines()
    for table in (MODELS, DATASETS, SAMPLERS):
        for name, entry in table.items():
            assert any(line.split(None, 1) == [name, entry.doc] for line in lines), name
