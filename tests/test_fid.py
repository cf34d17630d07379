"""FID: real vs real/noise, an independent scipy check, world-size invariance under torchrun,
the reference cache, the shipped classifier, in-training FID, and the Inception paths."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    DEBIAN_DIR,
    REPO,
    TINY,
    cli_env,
    make_dataset,
    make_image_folder,
    run_cli,
    run_torchrun,
    synthetic_split,
)
from scipy import linalg

from ddp_diffusion import checkpoint, classifier, fid
from ddp_diffusion.classifier import accuracy, card, load_classifier, to_uint8
from ddp_diffusion.config import Config, DataConfig, FidConfig
from ddp_diffusion.errors import UserError
from ddp_diffusion.sources import load_split

FID_ARGS = ["--num-samples", "40", "--batch-size", "8", "--sampler", "ddim", "--steps", "5",
            "--guidance", "2.0", "--reference", "train"]


@pytest.fixture(scope="module")
def fid_args(tiny_data: Path) -> list[str]:
    """FID_ARGS on the tiny data: the fid command takes no path from a checkpoint's config."""
    return [*FID_ARGS, "--data-root", str(tiny_data)]


@pytest.fixture(scope="module")
def fashion() -> torch.nn.Module:
    return fid.build_extractor("fashion")


@pytest.fixture(scope="module")
def real_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with the real Fashion-MNIST, prepared from Debian's package."""
    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST absent: apt-get install dataset-fashion-mnist "
                    f"(expected in {DEBIAN_DIR})")
    root = tmp_path_factory.mktemp("real_data")
    load_split(root, train=True, debian_dir=DEBIAN_DIR)
    return root


@pytest.fixture(scope="module")
def trained_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 10-step run that also evaluated FID in training at steps 5 and 10."""
    out = tmp_path_factory.mktemp("fid") / "run"
    run_cli("train", *TINY, f"out_dir={out}", f"data.root={tiny_data}", "train.max_steps=10",
            "fid.every=5", "fid.num_samples=20", "fid.batch_size=10", "fid.steps=3")
    return out


def _fid(extractor: torch.nn.Module, states: dict[str, torch.Tensor], fake: torch.Tensor
         ) -> float:
    metric = fid.new_metric(extractor)
    fid.set_reference(metric, states)
    for i in range(0, len(fake), 500):
        metric.update(fake[i:i + 500], real=False)
    return float(metric.compute())


def test_real_vs_real_is_small_and_noise_vs_real_is_large(real_root: Path,
                                                          fashion: torch.nn.Module) -> None:
    ref = fid.reference_stats(fashion, DataConfig(root=str(real_root)), "test", 32)
    assert ref.num_samples == 10000
    train_images, _ = load_split(real_root, train=True)
    real = to_uint8(train_images[torch.randperm(60000, generator=torch.Generator().manual_seed(0))
                                 [:3000]])
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    blank = torch.zeros_like(real)
    blank[:, :, 8:24, 8:24] = 200  # a grey square: no garment
    fid_real, fid_noise, fid_blank = (_fid(fashion, ref.states, x) for x in (real, noise, blank))
    assert fid_real < 1.0, fid_real
    assert fid_noise > 100 * fid_real and fid_blank > 100 * fid_real, (fid_noise, fid_blank)


# Dead ReLU units make the covariances singular; sqrtm warns but is accurate here.
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_equals_independent_scipy_computation(fashion: torch.nn.Module) -> None:
    a = torch.from_numpy(synthetic_split(1500, 3)[0])
    b = torch.from_numpy(synthetic_split(1500, 4)[0]).roll(3, dims=-1)  # bars moved right
    metric = fid.new_metric(fashion)
    metric.update(to_uint8(a), real=True)
    metric.update(to_uint8(b), real=False)
    ours = float(metric.compute())
    with torch.no_grad():
        fa, fb = (fashion(to_uint8(x)).double().numpy() for x in (a, b))
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    cov_a, cov_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    assert expected > 1.0  # a real difference, not two near-zero numbers
    assert ours == pytest.approx(expected, rel=1e-4)


def test_reference_cache_is_reused_and_keyed_by_extractor(tmp_path: Path,
                                                          fashion: torch.nn.Module) -> None:
    root = make_dataset(tmp_path / "data", n_train=300, n_test=60)
    data = DataConfig(root=str(root))
    first = fid.reference_stats(fashion, data, "train", 32)
    assert not first.cached and first.path.is_file() and first.num_samples == 300
    mtime = first.path.stat().st_mtime_ns
    again = fid.reference_stats(fashion, data, "train", 32)
    assert again.cached and again.path == first.path
    assert first.path.stat().st_mtime_ns == mtime  # not rewritten
    for k, v in first.states.items():
        assert torch.equal(again.states[k], v), k
    test_split = fid.reference_stats(fashion, data, "test", 32)
    assert not test_split.cached and test_split.num_samples == 60

    changed = copy.deepcopy(fashion)
    with torch.no_grad():
        changed.classifier.body[0].weight[0, 0, 0, 0] += 0.5
    assert fid.checksum(changed) != fid.checksum(fashion)
    other = fid.reference_stats(changed, data, "train", 32)
    assert not other.cached and other.path != first.path
    assert not torch.equal(other.states["real_features_sum"], first.states["real_features_sum"])
    assert sorted(p.name for p in (root / "fid_reference").iterdir()) == sorted(
        p.name for p in (first.path, test_split.path, other.path))


def test_classifier_accuracy_matches_the_shipped_number(real_root: Path) -> None:
    shipped = card()
    images, labels = load_split(real_root, train=False)
    acc = accuracy(load_classifier(), images, labels)
    assert shipped["test_accuracy"] >= 0.93
    # Thread counts change float rounding: allow a handful of the 10k predictions to flip.
    assert acc == pytest.approx(shipped["test_accuracy"], abs=5e-4)


def test_classifier_checksum_is_verified(tmp_path: Path) -> None:
    data = bytearray(classifier.WEIGHTS.read_bytes())
    assert classifier.sha256_file(classifier.WEIGHTS) == card()["sha256"]
    data[-100] ^= 1
    bad = tmp_path / "classifier.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"have SHA-256 \w+, expected \w+: the file is corrupt"):
        load_classifier(bad)


def test_fid_cli_writes_json_and_in_training_fid_is_logged(trained_run: Path,
                                                           fid_args: list[str], tiny_data: Path,
                                                           tmp_path: Path) -> None:
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text()
               .splitlines()]
    fid_records = [r for r in records if "fid" in r]
    assert [r["step"] for r in fid_records] == [5, 10]
    # The FID of that step's EMA weights: the fid command on the step-10 checkpoint with the
    # run's fid settings draws the same 20 samples in the same chunks in one process, so its
    # numbers are the same to the bit.
    again = json.loads(run_cli("fid", "--run", str(trained_run), "--num-samples", "20",
                               "--batch-size", "10", "--steps", "3", "--data-root",
                               str(tiny_data)).stdout)
    assert again["step"] == 10 and again["num_samples"] == 20
    assert (fid_records[1]["fid"], fid_records[1]["class_accuracy"]) == (
        again["fid"], again["class_accuracy"])
    assert fid_records[0]["class_accuracy"] in {k / 20 for k in range(21)}  # of 20 samples

    out = tmp_path / "result.json"
    proc = run_cli("fid", "--run", str(trained_run), *fid_args, "--seed", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    assert result["step"] == 10 and result["num_samples"] == 40 and result["world_size"] == 1
    assert result["features"] == "fashion" and result["reference_samples"] == 160
    assert result["fid"] > 0 and result["samples_per_s"] > 0 and result["wall_s"] > 0
    assert result["class_accuracy"] in {k / 40 for k in range(41)}
    other = json.loads(run_cli("fid", "--run", str(trained_run), *fid_args, "--seed", "2")
                       .stdout)
    assert other["reference_cached"]  # the first run cached the statistics
    assert other["samples_sha256"] != result["samples_sha256"]  # another seed, other images
    assert other["fid"] != result["fid"]


MORE = ("kid", "kid_std", "precision", "recall")


def test_kid_and_precision_recall_of_a_set_against_itself_and_a_shifted_copy() -> None:
    """A set against itself: every point lies in its own neighbourhood (precision = recall =
    1); against another draw of the same distribution KID (unbiased MMD^2) is near zero. Against
    a copy moved far away: no point in the other set's neighbourhoods (0 and 0) and a large
    KID; moved by a little: in between."""
    torch.manual_seed(0)
    a, other_draw = torch.randn(2000, 16), torch.randn(2000, 16)
    same = fid.kid_and_precision_recall(a, a, seed=1)
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    far = fid.kid_and_precision_recall(a + 10, a, seed=1)
    assert (far["precision"], far["recall"]) == (0.0, 0.0)
    near = fid.kid_and_precision_recall(a + 1, a, seed=1)
    assert 0 < near["precision"] < 1 and 0 < near["recall"] < 1
    drawn = fid.kid_and_precision_recall(other_draw, a, seed=1)
    assert abs(drawn["kid"]) < near["kid"] / 20 and near["kid"] < far["kid"] / 20
    assert 0 < drawn["kid_std"] < near["kid"]  # 100 random subsets of 1000: a spread
    # precision and recall swap when the sets do (a's neighbourhoods vs b's)
    b = torch.randn(2000, 16) * 1.5
    ab, ba = (fid.kid_and_precision_recall(x, y, seed=1) for x, y in ((a, b), (b, a)))
    assert (ab["precision"], ab["recall"]) == (ba["recall"], ba["precision"])
    assert ab["precision"] > 0.9 > ab["recall"]  # a wider b covers a, not the reverse


@pytest.mark.slow
def test_same_samples_and_fid_for_world_size_1_and_2(trained_run: Path,
                                                     fid_args: list[str]) -> None:
    one = json.loads(run_cli("fid", "--run", str(trained_run), *fid_args).stdout)
    # torchrun's parser takes '--run' for its --run-path: the alias --run-dir avoids that.
    two = json.loads(run_torchrun(2, "fid", "--run-dir", str(trained_run), *fid_args).stdout)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["samples_sha256"] == one["samples_sha256"]
    assert two["class_accuracy"] == one["class_accuracy"]
    # Statistics summed in another order: float64 rounding, then FID is returned as float32.
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-5)
    # KID and precision/recall: from the same features of the same chunks, gathered in order
    assert {k: two[k] for k in MORE} == {k: one[k] for k in MORE}


@pytest.mark.slow
@pytest.mark.parametrize("num_samples", [16, 40], ids=["2-chunks-on-3-ranks", "5-chunks-uneven"])
def test_3_ranks_with_fewer_or_uneven_chunks_give_the_one_rank_result(trained_run: Path,
                                                                      fid_args: list[str],
                                                                      num_samples: int) -> None:
    """A rank with no chunk adds nothing, yet joins the sum over ranks (it used to crash)."""
    args = [*fid_args, "--num-samples", str(num_samples)]  # the later flag wins
    one = json.loads(run_cli("fid", "--run", str(trained_run), *args).stdout)
    three = json.loads(run_torchrun(3, "fid", "--run-dir", str(trained_run), *args).stdout)
    assert (one["world_size"], three["world_size"]) == (1, 3)
    assert three["num_samples"] == one["num_samples"] == num_samples
    assert three["samples_sha256"] == one["samples_sha256"]
    assert three["class_accuracy"] == one["class_accuracy"]
    assert three["fid"] == pytest.approx(one["fid"], rel=1e-5)
    assert {k: three[k] for k in MORE} == {k: one[k] for k in MORE}


@pytest.mark.slow
def test_in_training_fid_on_more_ranks_than_chunks_equals_the_fid_command(tiny_data: Path,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "three"
    fid_settings = ("--num-samples", "20", "--batch-size", "10", "--steps", "3",  # 2 chunks
                    "--data-root", str(tiny_data))
    run_torchrun(3, "train", *TINY, f"out_dir={out}", f"data.root={tiny_data}",
                 "train.batch_size=24", "train.max_steps=5", "fid.every=5",
                 "fid.num_samples=20", "fid.batch_size=10", "fid.steps=3")
    logged = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                  if "fid" in json.loads(line))
    # The same EMA weights, seed, settings and precision, evaluated again by one process.
    again = json.loads(run_cli("fid", "--run", str(out), *fid_settings).stdout)
    assert logged["step"] == again["step"] == 5
    assert logged["fid"] == pytest.approx(again["fid"], rel=1e-5)
    assert logged["class_accuracy"] == again["class_accuracy"]
    assert (logged["precision"], logged["recall"]) == (again["precision"], again["recall"])
    assert logged["kid"] == pytest.approx(again["kid"], rel=1e-5)
    assert logged["kid_std"] == pytest.approx(again["kid_std"], rel=1e-5)


@pytest.mark.slow
def test_in_training_fid_under_torchrun_matches_one_process(trained_run: Path, tiny_data: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "two"
    run_torchrun(2, "train", *TINY, f"out_dir={out}", f"data.root={tiny_data}",
                 "train.max_steps=5", "fid.every=5", "fid.num_samples=20", "fid.batch_size=10",
                 "fid.steps=3")  # all ranks evaluate; a rank-0-only FID would hang here
    two = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    fid_two = next(r for r in two if "fid" in r)
    fid_one = next(r for r in one if "fid" in r and r["step"] == 5)
    # DDP and one process reach the same weights up to float rounding (see test_distributed).
    assert fid_two["step"] == 5 and fid_two["fid"] == pytest.approx(fid_one["fid"], rel=1e-3)
    assert fid_two["class_accuracy"] == pytest.approx(fid_one["class_accuracy"], abs=0.051)


def test_missing_inception_weights_offline_is_one_clear_line(trained_run: Path,
                                                             tiny_data: Path,
                                                             tmp_path: Path) -> None:
    # No network here; a proxy that refuses connections makes that certain on any machine.
    env = cli_env()
    env.update({"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
                "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""})
    proc = subprocess.run([sys.executable, "-m", "ddp_diffusion", "fid", "--run",
                           str(trained_run), "--data-root", str(tiny_data), "--features",
                           "inception", "--num-samples", "4"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    target = tmp_path / "torch" / "hub" / "checkpoints" / fid.INCEPTION_FILE
    assert proc.stderr.strip() == (
        "error: --features inception needs the InceptionV3 weights "
        "weights-inception-2015-12-05-6726825d.pth, which are not in "
        f"{target.parent} and could not be downloaded (URLError): fetch "
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        f"weights-inception-2015-12-05-6726825d.pth on a machine with internet and copy it to "
        f"{target}, or pass its path with --inception-weights PATH (config: "
        "fid.inception_weights)")


def _random_inception_state_dict() -> dict[str, torch.Tensor]:
    """InceptionV3 FID weights with PyTorch's default random init (the real ones need network).

    torch-fidelity's constructor builds every layer and then loads weights; given an empty file
    the load fails, and the half-built module still holds all layers, randomly initialised.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    module = FeatureExtractorInceptionV3.__new__(FeatureExtractorInceptionV3)
    with pytest.raises(EOFError, match="Ran out of input"):  # torch.load of an empty file
        module.__init__("inception-v3-compat", ["2048"],
                        feature_extractor_weights_path="/dev/null")
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_inception_features_load_a_local_state_dict(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """There is no network here, so the real weights cannot be fetched: this tests the plumbing
    (path and hub-cache lookup, safe loading, greyscale to RGB, 2048-d features, FID) with a
    locally saved, randomly initialised InceptionV3 state dict."""
    state = _random_inception_state_dict()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / fid.INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    assert fid.inception_weights(None) == cached  # found in the hub cache, no download
    extractor = fid.build_extractor("inception")
    assert isinstance(extractor, fid.InceptionFeatures)
    loaded = extractor.inception.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    images = to_uint8(torch.from_numpy(synthetic_split(6, 0)[0]))
    with torch.no_grad():
        feats = extractor(images)
        rgb = extractor.inception(images.repeat(1, 3, 1, 1))
    assert feats.shape == (6, 2048) and torch.isfinite(feats).all() and torch.equal(feats, rgb)
    metric = fid.new_metric(extractor)
    metric.update(images[:3], real=True)
    metric.update(images[3:], real=False)
    # FID is computed from exactly these features: its statistics are their sums in float64 ...
    with torch.no_grad():
        real, fake = (extractor(x).double() for x in (images[:3], images[3:]))
    assert torch.equal(metric.real_features_sum, real.sum(0))
    assert torch.equal(metric.real_features_cov_sum, real.T @ real)
    assert torch.equal(metric.fake_features_sum, fake.sum(0))
    assert metric.real_features_num_samples == metric.fake_features_num_samples == 3
    # ... and its value is where its definition puts it: the squared distance of the means plus
    # a squared distance of the covariances (Bures), which lies between 0 and tr Cr + tr Cf.
    means = (real.mean(0) - fake.mean(0)).square().sum().item()
    traces = real.var(0).sum().item() + fake.var(0).sum().item()
    assert means > 0 and traces > 0
    assert means <= metric.compute().item() <= means + traces

    with pytest.raises(UserError, match="does not exist"):
        fid.inception_weights(tmp_path / "missing.pth")
    bad = tmp_path / "crafted.pth"
    torch.save({"payload": _Payload()}, bad)  # not plain tensors: refused, never unpickled
    with pytest.raises(UserError, match="is not a loadable weights file"):
        fid.build_extractor("inception", bad)


class _Payload:
    """An arbitrary Python object: weights_only loading must refuse it."""


class _RunsCode:
    """Unpickled by a full unpickler, it makes a folder: proof that the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.marker),)


def test_the_inception_weights_used_are_the_bytes_that_were_checked(tmp_path: Path) -> None:
    """The weights path is a symlink an attacker points at a crafted file as soon as the check
    has opened the good one (for real, at the next audit event of this process: before any
    further read of the path): the extractor holds the checked weights and the crafted file's
    code never runs."""
    state = _random_inception_state_dict()
    good, crafted, marker = tmp_path / "good.pth", tmp_path / "crafted.pth", tmp_path / "ran"
    torch.save(state, good)
    torch.save({"fc.weight": _RunsCode(marker)}, crafted)
    link = tmp_path / "weights.pth"
    link.symlink_to(good)
    opened: list[str] = []

    def swap_after_the_check(event: str, args: tuple) -> None:
        if opened == ["checked"]:
            opened.append("swapped")  # first: the swap's own calls are audit events too
            link.unlink()
            link.symlink_to(crafted)
        elif not opened and event == "open" and os.fspath(args[0]) == str(link):
            opened.append("checked")

    sys.addaudithook(swap_after_the_check)
    try:
        extractor = fid.build_extractor("inception", link)
    finally:
        opened.append("done")  # the hook stays installed in this process and does nothing
    assert opened[:2] == ["checked", "swapped"] and link.resolve() == crafted
    assert not marker.exists()
    loaded = extractor.inception.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_fid_uses_no_path_from_a_checkpoint(trained_run: Path, tiny_data: Path,
                                            tmp_path: Path) -> None:
    """A checkpoint whose config names a data root (where the reference cache would be written)
    and Inception weights: fid writes its cache under --data-root and takes the weights from
    the torch hub cache, and says which of the checkpoint's paths it did not use."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _, path = checkpoint.list_checkpoints(run / "checkpoints")[-1]
    state = checkpoint.read(path)
    elsewhere, crafted = tmp_path / "elsewhere", tmp_path / "crafted.pth"
    crafted.write_text("not weights")
    state["config"]["data"]["root"] = str(elsewhere)
    state["config"]["fid"]["inception_weights"] = str(crafted)
    checkpoint.write_atomic(state, path)
    torch_home = tmp_path / "torch"
    cached = torch_home / "hub" / "checkpoints" / fid.INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    torch.save(_random_inception_state_dict(), cached)
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    cached_before = set(os.listdir(data / "fid_reference"))  # other tests' fashion caches

    proc = run_cli("fid", "--run", str(run), "--data-root", str(data), "--features", "inception",
                   "--reference", "test", "--num-samples", "4", "--batch-size", "4", "--steps",
                   "2", env={"TORCH_HOME": str(torch_home)})
    assert json.loads(proc.stdout)["reference_samples"] == 40  # the tiny test split
    assert not elsewhere.exists()
    (cache,) = set(os.listdir(data / "fid_reference")) - cached_before
    assert cache.startswith("fashion_mnist-test-")
    assert (f"not used from the checkpoint's config: data.root={elsewhere}, "
            f"fid.inception_weights={crafted} (fid reads and writes only where its flags say: "
            f"--data-root {data})") in proc.stderr


def test_fid_of_an_image_folder_run_uses_inception_and_its_own_images(tmp_path: Path) -> None:
    """Reference statistics come from the run's folder (cached), class accuracy is left out
    (no classifier for this data), and the Fashion-MNIST features are refused."""
    pets = make_image_folder(tmp_path / "pets", per_class=6)
    data, out = tmp_path / "data", tmp_path / "run"
    run_cli("train", *TINY, "data.dataset=image_folder", f"data.path={pets}",
            f"data.root={data}", "data.num_workers=0", f"out_dir={out}", "train.max_steps=2",
            "train.batch_size=4")
    weights = tmp_path / "inception.pth"
    torch.save(_random_inception_state_dict(), weights)
    paths = ["--data-root", str(data), "--data-path", str(pets)]
    args = ["fid", "--run", str(out), *paths, "--features", "inception", "--inception-weights",
            str(weights), "--num-samples", "6", "--batch-size", "3", "--steps", "2"]
    first = json.loads(run_cli(*args, "--out", str(tmp_path / "a.json")).stdout)
    assert first["dataset"] == "image_folder" and "class_accuracy" not in first
    assert first["reference_samples"] == 12 and first["reference_cached"] is False
    assert math.isfinite(first["fid"]) and first["fid"] > 0
    again = json.loads(run_cli(*args).stdout)
    assert again["reference_cached"] is True and again["fid"] == first["fid"]
    (cache,) = (data / "fid_reference").iterdir()
    assert cache.name.startswith("image_folder-train-")
    refused = run_cli("fid", "--run", str(out), *paths, "--features", "fashion", check=False)
    assert (refused.returncode, refused.stderr) == (2, (
        "error: --features=fashion uses a Fashion-MNIST classifier (32x32, by class); for "
        "image_folder use --features=inception\n"))


def test_the_floor_is_near_zero_for_the_reference_itself_and_positive_for_the_other_split(
        tiny_data: Path) -> None:
    cfg = Config(data=DataConfig(root=str(tiny_data)))
    fc = FidConfig(num_samples=160, batch_size=50, features="fashion", reference="train")
    itself = fid.real_fid(cfg, fc, "train")  # all 160 training images against themselves
    other = fid.real_fid(cfg, dataclasses.replace(fc, num_samples=40), "test")
    assert (itself["num_samples"], other["num_samples"]) == (160, 40)
    assert other["fid"] > 0.5 and itself["fid"] < 0.01 * other["fid"], (itself, other)
    with pytest.raises(UserError, match=r"^the test split has 40 images, fewer than the 41 "):
        fid.real_fid(cfg, dataclasses.replace(fc, num_samples=41), "test")
