"""`export`: a run's weights as one safetensors file with the settings to sample from it, which
`sample` and `fid --weights` use without the run directory and give the same images as the run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, final_state, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddp_diffusion.checkpoint import Part

SET = ["--num-samples", "6", "--batch-size", "3", "--sampler", "ddim", "--steps", "3",
       "--guidance", "2", "--seed", "2"]


@pytest.fixture(scope="module")
def run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("weights") / "run"
    run_cli("train", *TINY, f"out_dir={out}", f"data.root={tiny_data}", "train.max_steps=10",
            "train.ema_posthoc=true", "train.ema_posthoc_every=5")
    return out


def export(run: Path, out: Path, *flags: str) -> dict:
    return json.loads(run_cli("export", "--run", str(run), "--out", str(out), *flags).stdout)


def grid(tmp_path: Path, *flags: str) -> bytes:
    out = tmp_path / f"grid{len(list(tmp_path.glob('grid*')))}.png"
    run_cli("sample", *flags, "--per-class", "1", "--out", str(out))
    return out.read_bytes()


def fid(tiny_data: Path, *flags: str) -> dict:
    proc = run_cli("fid", *flags, *SET, "--data-root", str(tiny_data))
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_the_file_gives_the_runs_samples_and_fid_without_the_run(run: Path, tiny_data: Path,
                                                                  tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    info = export(run, model)
    assert info["weights"] == "ema" and info["step"] == 10
    # Plain safetensors: the EMA tensors, readable without our code.
    tensors, ema = load_file(model), final_state(run)[Part.EMA]
    assert tensors.keys() == ema.keys() and all(torch.equal(tensors[k], ema[k]) for k in ema)

    assert grid(tmp_path, "--weights", str(model)) == grid(tmp_path, "--run", str(run))
    from_file, from_run = fid(tiny_data, "--weights", str(model)), fid(tiny_data, "--run",
                                                                        str(run))
    assert from_file["weights"] == str(model) and "run" not in from_file
    for key in ("fid", "kid", "class_accuracy", "samples_sha256"):
        assert from_file[key] == from_run[key], key
    npz = tmp_path / "s.npz"
    run_cli("sample", "--weights", str(model), *SET, "--out-npz", str(npz))
    assert np.load(npz)["arr_0"].shape == (6, 32, 32, 1)


def test_raw_and_post_hoc_weights_export_as_what_sample_would_use(run: Path,
                                                                  tmp_path: Path) -> None:
    raw = tmp_path / "raw.safetensors"
    assert export(run, raw, "--no-ema")["weights"] == "raw"
    assert grid(tmp_path, "--weights", str(raw)) == grid(tmp_path, "--run", str(run), "--no-ema")
    assert grid(tmp_path, "--weights", str(raw)) != grid(tmp_path, "--run", str(run))

    posthoc_pt, posthoc = tmp_path / "ema.pt", tmp_path / "posthoc.safetensors"
    run_cli("ema", "--run", str(run), "--sigma-rel", "0.08", "--out", str(posthoc_pt))
    assert export(run, posthoc, "--ema-weights", str(posthoc_pt))["file"] == "ema.pt"
    assert grid(tmp_path, "--weights", str(posthoc)) == grid(tmp_path, "--run", str(run),
                                                             "--ema-weights", str(posthoc_pt))


def test_the_metadata_has_the_settings_and_no_local_path(run: Path, tiny_data: Path,
                                                         tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    export(run, model)
    with safe_open(str(model), framework="pt") as f:
        metadata = f.metadata()
    cfg = json.loads(metadata["config"])
    saved = final_state(run)["config"]
    assert cfg["model"] == saved["model"] and cfg["diffusion"] == saved["diffusion"]
    assert cfg["data"]["dataset"] == "fashion_mnist" and "root" not in cfg["data"]
    assert json.loads(metadata["class_names"])[7] == "Sneaker"
    text = json.dumps(metadata)
    assert str(tiny_data) not in text and str(run) not in text and "out_dir" not in text


def one_line(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in proc.stderr


def test_bad_weights_and_flags_are_one_line(run: Path, tmp_path: Path) -> None:
    g = ["--per-class", "1", "--out", str(tmp_path / "g.png")]
    one_line(run_cli("export", "--run", str(run), "--out", str(tmp_path / "m.pt"), check=False),
             f"--out {tmp_path / 'm.pt'}: name a .safetensors file")
    one_line(run_cli("sample", *g, check=False), "give --run RUN (a run directory) or --weights")
    model = tmp_path / "model.safetensors"
    export(run, model)
    one_line(run_cli("sample", "--run", str(run), "--weights", str(model), *g, check=False),
             "give --run RUN (a run directory) or --weights")
    one_line(run_cli("fid", "--weights", str(model), "--no-ema", check=False),
             "--ema/--no-ema chooses weights from a run directory")
    one_line(run_cli("sample", "--weights", str(model), "--checkpoint", "x.pt", *g,
                     check=False), "--checkpoint chooses weights from a run directory")
    one_line(run_cli("sample", "--weights", str(tmp_path / "none.safetensors"), *g, check=False),
             f"--weights {tmp_path / 'none.safetensors'}: no such file")
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    one_line(run_cli("sample", "--weights", str(checkpoint), *g, check=False),
             f"--weights {checkpoint} cannot be read as safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(model), foreign)  # the same tensors, without our metadata
    one_line(run_cli("sample", "--weights", str(foreign), *g, check=False),
             f"--weights {foreign} holds no ddp-diffusion metadata")
    with safe_open(str(model), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(model)
    gone = sorted(tensors)[0]
    del tensors[gone]
    save_file(tensors, tmp_path / "torn.safetensors", metadata)  # our metadata, a tensor short
    one_line(run_cli("sample", "--weights", str(tmp_path / "torn.safetensors"), *g, check=False),
             f"--weights {tmp_path / 'torn.safetensors'} does not fit the model its metadata "
             f"describes: it lacks {gone} (1 missing); export it again")
    assert not (tmp_path / "g.png").exists()
