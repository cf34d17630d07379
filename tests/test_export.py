"""`sample --out-npz / --out-dir`: the sample set fid scores, written as evaluation suites read
it, the same for any world size, resumable after a kill."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY, cli_env, run_cli, run_torchrun
from PIL import Image

# 10 images in chunks of 4: three chunks, the last one short; two ranks draw 0 and 2, and 1.
SET = ["--num-samples", "10", "--batch-size", "4", "--sampler", "ddim", "--steps", "3",
       "--guidance", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    run_cli("train", *TINY, f"out_dir={out}", f"data.root={tiny_data}", "train.max_steps=10")
    return out


def summary(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_the_npz_is_the_adm_layout_the_same_on_two_ranks_and_the_set_fid_scores(
        run: Path, tiny_data: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    run_cli("sample", "--run", str(run), *SET, "--out-npz", str(one))
    result = summary(run_torchrun(2, "sample", "--run-dir", str(run), *SET, "--out-npz",
                                  str(two)))
    assert (result["world_size"], result["chunks"], result["chunks_generated"]) == (2, 3, 3)
    assert not (tmp_path / "two.npz.parts").exists()  # the chunk files are gone once joined

    a, b = np.load(one), np.load(two)
    assert a.files == ["arr_0", "arr_1"]  # guided-diffusion's names, which the ADM suite reads
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (10, 32, 32, 1)  # N, H, W, C
    assert a["arr_1"].tolist() == [i % 10 for i in range(10)]  # class-balanced
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert len(np.unique(a["arr_0"].reshape(10, -1), axis=0)) == 10  # ten different images

    # fid with the same settings scores exactly these images: its digest is of each chunk's
    # pixels (N, C, H, W) in chunk order.
    fid = summary(run_cli("fid", "--run", str(run), *SET, "--data-root", str(tiny_data)))
    nchw = a["arr_0"].transpose(0, 3, 1, 2)
    chunks = "".join(hashlib.sha256(np.ascontiguousarray(nchw[lo:lo + 4]).tobytes()).hexdigest()
                     for lo in range(0, 10, 4))
    assert fid["samples_sha256"] == hashlib.sha256(chunks.encode()).hexdigest()


def test_a_png_folder_holds_the_same_images_and_edms_label_file(run: Path,
                                                                tmp_path: Path) -> None:
    run_cli("sample", "--run", str(run), *SET, "--classes", "bag,sneaker", "--out-npz",
            str(tmp_path / "s.npz"))
    run_cli("sample", "--run", str(run), *SET, "--classes", "bag,sneaker", "--out-dir",
            str(tmp_path / "pngs"))
    arrays = np.load(tmp_path / "s.npz")
    labels = json.loads((tmp_path / "pngs" / "dataset.json").read_text())["labels"]
    assert labels == [[f"{i:06d}.png", [8, 7][i % 2]] for i in range(10)]
    assert arrays["arr_1"].tolist() == [c for _, c in labels]
    pngs = np.stack([np.asarray(Image.open(tmp_path / "pngs" / name)) for name, _ in labels])
    assert np.array_equal(pngs, arrays["arr_0"][..., 0])
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == sorted(
        ["dataset.json", *(name for name, _ in labels)])
    again = run_cli("sample", "--run", str(run), *SET, "--out-dir", str(tmp_path / "pngs"),
                    check=False)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == (
        f"error: --out-dir {tmp_path / 'pngs'} is not empty and holds a finished export: name "
        "a new or empty folder")


def test_a_killed_export_resumes_with_the_chunks_it_wrote_and_refuses_other_settings(
        run: Path, tmp_path: Path) -> None:
    # 60 chunks of 2: killed after 3, long before the last (each is tens of ms at least)
    many = ["--num-samples", "120", "--batch-size", "2", "--sampler", "ddim", "--steps", "3"]
    out, parts = tmp_path / "s.npz", tmp_path / "s.npz.parts"
    proc = subprocess.Popen([sys.executable, "-m", "ddp_diffusion", "sample", "--run", str(run),
                             *many, "--out-npz", str(out)], env=cli_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("chunk-*.npy"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(parts.glob("chunk-*.npy")))
    assert not out.exists() and 3 <= written < 60

    other = run_cli("sample", "--run", str(run), *many[:-1], "4", "--out-npz", str(out),
                    check=False)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: {parts} holds an unfinished export with other settings (steps: 3 -> 4): "
        "delete it to start again, or export to another path")

    resumed = summary(run_cli("sample", "--run", str(run), *many, "--out-npz", str(out)))
    assert (resumed["chunks_reused"], resumed["chunks_generated"]) == (written, 60 - written)
    straight = tmp_path / "straight.npz"
    run_cli("sample", "--run", str(run), *many, "--out-npz", str(straight))
    assert np.array_equal(np.load(out)["arr_0"], np.load(straight)["arr_0"])


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "g.png", "--out-npz", "s.npz"], "sample writes one of: --out grid.png (a "
     "labelled grid), --out-npz samples.npz or --out-dir folder (--num-samples images)"),
    (["--out-npz", "s.npz"], "--out-npz needs --num-samples N (50000 is FID's standard)"),
    (["--out-npz", "s.png", "--num-samples", "8"], "--out-npz s.png: name a .npz file"),
    (["--out", "g.png", "--num-samples", "8"], "--num-samples is for --out-npz or --out-dir; "
     "a grid has --per-class images of each of --classes"),
    (["--out-dir", "d", "--num-samples", "8", "--per-class", "2"], "--per-class is for grids "
     "(--out); an export has --num-samples images, cycling through --classes"),
])
def test_export_flags_that_cannot_work_are_one_line(args: list[str], message: str,
                                                    tmp_path: Path) -> None:
    proc = run_cli("sample", "--run", str(tmp_path / "no-run"), *args, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {message}"]
