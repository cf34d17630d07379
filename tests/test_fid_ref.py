"""Reference statistics in the standard format: `fid-ref` writes mu and sigma as an .npz
(pytorch-fid's and the ADM suite's names), and `fid --ref-stats` compares with any such file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli

from ddp_diffusion.classifier import load_classifier, to_uint8
from ddp_diffusion.fid import FashionFeatures
from ddp_diffusion.sources import load_split

FID = ["--num-samples", "10", "--batch-size", "5", "--sampler", "ddim", "--steps", "3"]


@pytest.fixture(scope="module")
def run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fidref") / "run"
    run_cli("train", *TINY, f"out_dir={out}", f"data.root={tiny_data}", "train.max_steps=10")
    return out


@pytest.fixture(scope="module")
def stats(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stats") / "train.npz"
    proc = run_cli("fid-ref", f"data.root={tiny_data}", "--out", str(out))
    assert proc.stdout.strip() == (f"wrote {out}: mu and sigma of 160 fashion_mnist train "
                                   "images at 32x32, fashion features (128-d)")
    return out


def fid_of(run: Path, tiny_data: Path, *extra: str) -> dict:
    proc = run_cli("fid", "--run", str(run), *FID, "--data-root", str(tiny_data), *extra)
    return json.loads(proc.stdout)


def test_the_npz_holds_the_mean_and_covariance_of_the_real_features(tiny_data: Path,
                                                                     stats: Path) -> None:
    images, _ = load_split(tiny_data, train=True)
    with torch.no_grad():
        features = FashionFeatures(load_classifier())(to_uint8(images)).double().numpy()
    z = np.load(stats)
    assert z["mu"].shape == (128,) and z["sigma"].shape == (128, 128)
    np.testing.assert_allclose(z["mu"], features.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(z["sigma"], np.cov(features, rowvar=False), rtol=1e-5,
                               atol=1e-8)
    assert int(z["num_samples"]) == 160
    assert (str(z["features"]), str(z["dataset"]), str(z["split"])) == (
        "fashion", "fashion_mnist", "train")


def test_fid_against_the_file_equals_fid_against_the_split(run: Path, tiny_data: Path,
                                                           stats: Path, tmp_path: Path) -> None:
    split = fid_of(run, tiny_data)
    ours = fid_of(run, tiny_data, "--ref-stats", str(stats))
    assert ours["reference"] == str(stats) and split["reference"] == "train"
    assert ours["samples_sha256"] == split["samples_sha256"]
    assert ours["fid"] == pytest.approx(split["fid"], rel=1e-6)
    # A file of mu and sigma only (pytorch-fid's layout): the same number.
    z = np.load(stats)
    bare = tmp_path / "bare.npz"
    np.savez(bare, mu=z["mu"], sigma=z["sigma"])
    assert fid_of(run, tiny_data, "--ref", str(bare))["fid"] == pytest.approx(split["fid"],
                                                                              rel=1e-6)
    # The file is what is compared with: moving its mean by +1 and by -1 in each of the 128
    # dimensions adds |d + 1|^2 + |d - 1|^2 - 2|d|^2 = 2 x 128 to the sum of the two FIDs.
    moved = []
    for shift in (1.0, -1.0):
        np.savez(bare, mu=z["mu"] + shift, sigma=z["sigma"])
        moved.append(fid_of(run, tiny_data, "--ref", str(bare))["fid"])
    assert sum(moved) - 2 * split["fid"] == pytest.approx(256, rel=1e-4)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"mu": np.zeros(128)}, "has no mu and sigma (it holds mu); write one with ddp-diffusion "
                            "fid-ref"),
    ({"mu": np.zeros(2048), "sigma": np.eye(2048)}, "holds 2048-d statistics, but features "
                                                     "fashion are 128-d: use the features it "
                                                     "was made with"),
    ({"mu": np.zeros(128), "sigma": np.eye(128), "features": np.str_("inception")},
     "was made with features inception, not fashion: use --features inception"),
])
def test_a_stats_file_that_cannot_be_used_is_one_line(run: Path, tiny_data: Path,
                                                      tmp_path: Path, arrays: dict,
                                                      message: str) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, **arrays)
    proc = run_cli("fid", "--run", str(run), *FID, "--data-root", str(tiny_data), "--ref",
                   str(path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: --ref-stats {path} {message}"


def test_a_stats_path_that_is_not_an_npz_is_refused_before_any_work(tiny_data: Path,
                                                                     tmp_path: Path) -> None:
    proc = run_cli("fid-ref", f"data.root={tiny_data}", "--out", str(tmp_path / "s.pt"),
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --out {tmp_path / 's.pt'}: name an "
                                                ".npz file"]
    proc = run_cli("train", *TINY, "fid.ref_stats=stats.pt", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: fid.ref_stats=stats.pt: name an .npz file of mu and sigma (ddp-diffusion "
        "fid-ref writes one)"]
