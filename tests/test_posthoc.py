"""Post-hoc EMA (EDM2): the power-function EMA against its averaging profile, reconstruction from
snapshots against EMAs tracked directly, training that snapshots and resumes bit for bit, and the
`ema` command whose weights `sample --ema-weights` uses."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    TINY,
    TINY_MODEL,
    assert_same_run,
    cli_env,
    final_state,
    run_cli,
    set_loss_scale,
    trainer_in_process,
    wait_for_step,
)

from ddp_diffusion import checkpoint, posthoc, runs
from ddp_diffusion.checkpoint import Part
from ddp_diffusion.diffusion import build_denoiser
from ddp_diffusion.ema import EMA

# ------------------------------------------------------------------------------------ the math


def test_sigma_rel_and_gamma_are_the_papers() -> None:
    # EDM2 (section 3) tracks sigma_rel 0.05 and 0.10, i.e. gamma 16.97 and 6.94.
    assert posthoc.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert posthoc.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert posthoc.sigma_rel_to_gamma(posthoc.SIGMA_REL_MAX) == pytest.approx(0, abs=1e-9)
    for s in (1e-3, 0.01, 0.05, 0.137, 0.2, 0.28):
        assert posthoc.gamma_to_sigma_rel(posthoc.sigma_rel_to_gamma(s)) == pytest.approx(
            s, rel=1e-12)
    for bad in (0.0, -0.1, 0.29, math.nan):
        with pytest.raises(ValueError):
            posthoc.sigma_rel_to_gamma(bad)


def test_a_power_ema_is_the_average_of_its_profile() -> None:
    """Run step by step in float64, the EMA is sum_tau w_tau x_tau with w_tau the integral of
    p(tau) = (gamma+1) tau^gamma / t^(gamma+1) over (tau-1, tau]; its spread is sigma_rel."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    for sigma_rel in (0.05, 0.10, 0.25):
        gamma = posthoc.sigma_rel_to_gamma(sigma_rel)
        ema = 1234.0  # beta_1 = 0: the start is forgotten at the first step
        for t, value in enumerate(x, start=1):
            beta = posthoc.power_beta(t, gamma)
            ema = beta * ema + (1 - beta) * value
            if t in (1, 7, 100, 400):
                w = posthoc.step_weights(t, gamma)
                assert ema == pytest.approx(float(np.dot(w, x[:t])), rel=1e-12, abs=1e-12)
        # the step weights are the profile's integral over each step (a fine midpoint rule)
        t = len(x)
        for tau in (1, 200, 400):
            s = np.linspace(tau - 1, tau, 20001)[:-1] + 0.5 / 20000
            p = (gamma + 1) * s**gamma / t ** (gamma + 1)
            assert posthoc.step_weights(t, gamma)[tau - 1] == pytest.approx(p.mean(), rel=1e-6)
        w = np.array(posthoc.step_weights(10000, gamma))
        taus = np.arange(1, 10001) - 0.5
        mean = (w * taus).sum()
        assert math.sqrt((w * (taus - mean) ** 2).sum()) / 10000 == pytest.approx(sigma_rel,
                                                                                  rel=1e-3)


def test_profile_inner_products_are_the_integrals() -> None:
    for (gi, ti), (gj, tj) in [((6.94, 300), (16.97, 1000)), ((0.0, 50), (3.0, 50)),
                               ((16.97, 1000), (6.94, 300))]:
        s = np.linspace(0, min(ti, tj), 400001)[:-1] + min(ti, tj) / 800000
        pi = (gi + 1) * s**gi / ti ** (gi + 1)
        pj = (gj + 1) * s**gj / tj ** (gj + 1)
        assert posthoc.profile_inner(gi, ti, gj, tj) == pytest.approx(
            (pi * pj).mean() * min(ti, tj), rel=1e-6)
    # large gammas and steps do not overflow
    assert math.isfinite(posthoc.profile_inner(5000.0, 10**7, 5000.0, 10**7))


T, EVERY, TRACKED = 1000, 50, (0.05, 0.10, 0.07)


@pytest.fixture(scope="module")
def tracked() -> tuple[list[tuple[float, int]], list[dict], list[EMA]]:
    """EMAs (ema.EMA, fp32, as training keeps them) of sigma_rel 0.05, 0.10 and 0.07 of weights
    that drift and jitter over T steps; snapshots of the first two every EVERY steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4096, 1, bias=False)
    gammas = [posthoc.sigma_rel_to_gamma(s) for s in TRACKED]
    emas = [EMA(model) for _ in TRACKED]
    pairs, states = [], []
    walk = torch.zeros(4096)
    for t in range(1, T + 1):
        walk += 0.01 * torch.randn(4096)
        with torch.no_grad():
            model.weight.copy_(walk + 0.1 * torch.randn(4096))
        for gamma, ema in zip(gammas, emas, strict=True):
            ema.update(model, posthoc.power_beta(t, gamma), torch.tensor(False))
        if t % EVERY == 0:
            for i in (0, 1):
                pairs.append((gammas[i], t))
                states.append(copy.deepcopy(emas[i].state_dict()))
    return pairs, states, emas


def test_a_tracked_length_is_reconstructed_as_its_own_snapshot(tracked) -> None:
    pairs, states, emas = tracked
    for i, sigma_rel in enumerate(TRACKED[:2]):
        x = posthoc.solve_coefficients(pairs, sigma_rel, T)
        k = len(pairs) - 2 + i  # the snapshot of that length at step T
        one_hot = np.eye(len(pairs))[k]
        assert np.abs(np.array(x) - one_hot).max() < 1e-9
        assert posthoc.fit_error(pairs, x, sigma_rel, T) < 1e-6
        weights = posthoc.reconstruct(states, x)["weight"]
        torch.testing.assert_close(weights, emas[i].module.weight, rtol=1e-6, atol=1e-7)
    # and at an earlier snapshot's step, from the snapshots up to it
    x = posthoc.solve_coefficients(pairs[:10], 0.05, 5 * EVERY)
    assert np.abs(np.array(x) - np.eye(10)[8]).max() < 1e-9


def test_an_intermediate_length_matches_an_ema_tracked_at_it(tracked) -> None:
    """0.07 reconstructed from the 0.05 and 0.10 snapshots is ~500x closer to the EMA tracked
    at 0.07 than either input (measured: 8.9e-5 relative, against 0.051 and 0.069)."""
    pairs, states, emas = tracked
    target = emas[2].module.weight

    def error(w: torch.Tensor) -> float:
        return ((w - target).norm() / target.norm()).item()

    x = posthoc.solve_coefficients(pairs, 0.07, T)
    reconstructed = error(posthoc.reconstruct(states, x)["weight"])
    inputs = min(error(emas[0].module.weight), error(emas[1].module.weight))
    assert inputs > 0.03
    assert reconstructed < inputs / 50, (reconstructed, inputs)
    # the profile fit says so too: the combination's profile is within 1% of the target's,
    # either input alone is far
    assert posthoc.fit_error(pairs, x, 0.07, T) < 0.01
    assert min(posthoc.fit_error([p], [1.0], 0.07, T) for p in pairs[-2:]) > 0.2


def test_reconstruct_keeps_equal_buffers_and_the_dtype() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "buf": torch.tensor([0.3]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "buf": torch.tensor([0.3]), "n": torch.tensor(3)}
    out = posthoc.reconstruct(iter([a, b]), [0.7, 0.31])  # weights of sum 1.01
    assert torch.equal(out["buf"], a["buf"]) and torch.equal(out["n"], a["n"])
    torch.testing.assert_close(out["w"], torch.tensor([0.7 + 0.93, 1.4 + 1.86]))
    assert out["w"].dtype == torch.float32


# ------------------------------------------------------------------------------------ training

POSTHOC = ("train.ema_posthoc=true", "train.ema_posthoc_every=3")


def train_args(tiny_data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", *TINY, f"data.root={tiny_data}", f"out_dir={out}",
            f"train.max_steps={steps}", "train.log_every=1", "train.warmup_steps=3",
            "model.dropout=0.1", "train.lr_schedule=cosine", "train.min_lr_ratio=0.1",
            *POSTHOC, *extra]


def snapshot_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "posthoc").iterdir())}


def test_training_tracks_power_emas_and_resumes_bitwise_after_sigterm(tiny_data: Path,
                                                                      tmp_path: Path) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    # Every step's checkpoint kept: the weights the EMAs averaged, to replay them here.
    run_cli(*train_args(tiny_data, straight, 12, "train.ckpt_every=1", "train.keep_last=0"))
    proc = subprocess.Popen([sys.executable, "-m", "ddp_diffusion",
                             *train_args(tiny_data, stopped, 12, "train.ckpt_every=1000")],
                            cwd=REPO, env=cli_env(), stderr=subprocess.PIPE, text=True)
    wait_for_step(stopped / "metrics.jsonl", 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    (stopped_at, _), = checkpoint.list_checkpoints(stopped / "checkpoints")
    assert 4 <= stopped_at < 12
    assert sorted(snapshot_files(stopped)) == [f"posthoc-{s:08d}.pt"
                                               for s in range(3, stopped_at + 1, 3)]
    run_cli(*train_args(tiny_data, stopped, 12, "train.ckpt_every=1000"))

    # Every checkpointed part, the post-hoc EMAs included, and every snapshot file, bit for bit.
    assert_same_run(straight, stopped)
    assert snapshot_files(straight) == snapshot_files(stopped)
    assert list(snapshot_files(straight)) == [f"posthoc-{s:08d}.pt" for s in (3, 6, 9, 12)]
    state = final_state(straight)
    part = state[Part.POSTHOC_EMA]
    assert list(part) == ["0.05", "0.1"]
    changed = copy.deepcopy(state)
    next(iter(changed[Part.POSTHOC_EMA]["0.1"].values())).view(-1)[0] += 1e-6
    assert [d.split(":")[0].split(".")[1] for d in
            checkpoint.training_differences(state, changed)] == [Part.POSTHOC_EMA]

    # The newest snapshot holds the checkpoint's EMAs; each EMA is the power EMA of the
    # weights after every step, replayed here with posthoc.power_beta.
    snap = torch.load(straight / "posthoc" / "posthoc-00000012.pt", weights_only=True)
    assert snap["step"] == 12 and snap["sigma_rels"] == [0.05, 0.1]
    for sd, key in zip(snap["emas"], ("0.05", "0.1"), strict=True):
        assert all(torch.equal(sd[k], part[key][k]) for k in sd)
    model = build_denoiser(TINY_MODEL, 100)
    weights = {s: checkpoint.read(p)[Part.MODEL]
               for s, p in checkpoint.list_checkpoints(straight / "checkpoints")}
    for sigma_rel, key in ((0.05, "0.05"), (0.1, "0.1")):
        gamma = posthoc.sigma_rel_to_gamma(sigma_rel)
        model.load_state_dict(weights[1])
        ema = EMA(model)
        for t in range(2, 13):
            model.load_state_dict(weights[t])
            ema.update(model, posthoc.power_beta(t, gamma), torch.tensor(False))
        for k, v in ema.state_dict().items():
            torch.testing.assert_close(v, part[key][k], rtol=1e-5, atol=1e-7)
    # two lengths, neither the half-life EMA
    for other in (part["0.1"], state[Part.EMA]):
        assert any(not torch.equal(part["0.05"][k], other[k]) for k in other)


def test_a_skipped_step_advances_the_power_emas_with_the_unchanged_weights(
        tiny_data: Path, tmp_path: Path) -> None:
    """An fp16 overflow changes no weight; the power EMAs still take that step, with the
    weights it left (the previous ones), so each stays the average of every step's weights
    under its profile: holding them still would break the reconstruction's assumption."""
    with trainer_in_process(f"data.root={tiny_data}", f"out_dir={tmp_path / 'run'}",
                            "train.precision=fp16", *POSTHOC) as trainer:
        set_loss_scale(trainer.scaler, 1.0)  # two steps that cannot overflow
        for _ in range(2):
            assert not trainer.train_one_step()[2]
        weights = {k: v.float().clone() for k, v in trainer.model.state_dict().items()}
        before = [copy.deepcopy(ema.state_dict()) for ema in trainer.posthoc.emas]
        set_loss_scale(trainer.scaler, 2.0 ** 40)
        assert trainer.train_one_step()[2]  # skipped
        assert all(torch.equal(v.float(), weights[k])
                   for k, v in trainer.model.state_dict().items())
        for gamma, ema, old in zip(trainer.posthoc.gammas, trainer.posthoc.emas, before,
                                   strict=True):
            beta = posthoc.power_beta(3, gamma)
            moved = [k for k in old if not torch.equal(ema.state_dict()[k], old[k])]
            assert moved  # step 2's weights differ from the average of steps 1 and 2
            for k, v in ema.state_dict().items():
                torch.testing.assert_close(v, beta * old[k] + (1 - beta) * weights[k],
                                           rtol=1e-6, atol=1e-7)


def test_the_tracked_lengths_are_frozen_on_resume(tiny_data: Path, tmp_path: Path) -> None:
    run_cli(*train_args(tiny_data, tmp_path / "r", 3))
    proc = run_cli(*train_args(tiny_data, tmp_path / "r", 6,
                               "train.ema_posthoc_sigma_rels=[0.05,0.2]"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot resume from {tmp_path / 'r' / 'checkpoints' / 'ckpt-00000003.pt'}: "
        "train.ema_posthoc_sigma_rels: [0.05, 0.1] -> [0.05, 0.2] changed")


def test_snapshots_past_an_older_resumed_checkpoint_are_archived(tiny_data: Path,
                                                                  tmp_path: Path) -> None:
    """Resuming from an older checkpoint moves the later snapshots (another lineage from here)
    aside with the later checkpoints, so `ema` never combines the two."""
    out = tmp_path / "r"
    run_cli(*train_args(tiny_data, out, 6, "train.ckpt_every=3", "train.ema_posthoc_every=2"))
    assert list(snapshot_files(out)) == [f"posthoc-{s:08d}.pt" for s in (2, 4, 6)]
    old = snapshot_files(out)
    proc = run_cli(*train_args(tiny_data, out, 4, "train.ckpt_every=3",
                               "train.ema_posthoc_every=2",
                               f"train.resume={out / 'checkpoints' / 'ckpt-00000003.pt'}",
                               "train.lr=5e-4"))
    assert list(snapshot_files(out)) == [f"posthoc-{s:08d}.pt" for s in (2, 4)]
    assert snapshot_files(out)["posthoc-00000002.pt"] == old["posthoc-00000002.pt"]
    assert snapshot_files(out)["posthoc-00000004.pt"] != old["posthoc-00000004.pt"]  # new lr
    (archive,) = (out / "archive").iterdir()
    assert snapshot_files(archive) == {k: old[k] for k in ("posthoc-00000004.pt",
                                                           "posthoc-00000006.pt")}
    assert ("moved 1 checkpoint(s) and 2 post-hoc snapshot(s) newer than the resumed "
            f"checkpoint to {archive} (nothing is deleted)") in proc.stderr


# ---------------------------------------------------------------------------- the ema command


@pytest.fixture(scope="module")
def posthoc_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("posthoc_run")
    run_cli("train", *TINY, f"data.root={tiny_data}", f"out_dir={out}", "train.max_steps=12",
            "train.ema_posthoc=true", "train.ema_posthoc_every=4")
    return out


def test_ema_weights_are_what_sample_uses(posthoc_run: Path, tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    proc = run_cli("ema", "--run", str(posthoc_run), "--sigma-rel", "0.08", "--out",
                   str(weights))
    assert '"snapshots": 3' in proc.stdout and '"step": 12' in proc.stdout
    written = torch.load(weights, weights_only=True)
    expected, info = runs.posthoc_ema(runs.posthoc_snapshots(posthoc_run, None), 0.08, 12)
    assert written.keys() == final_state(posthoc_run)[Part.EMA].keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert info["profile_error"] < 0.1
    in_process = tmp_path / "in_process.pt"
    torch.save(expected, in_process)

    def grid(*flags: str) -> np.ndarray:
        from PIL import Image

        out = tmp_path / f"grid{len(list(tmp_path.glob('grid*')))}.png"
        run_cli("sample", "--run", str(posthoc_run), "--per-class", "1", "--out", str(out),
                *flags)
        return np.asarray(Image.open(out))

    from_file = grid("--ema-weights", str(weights))
    assert np.array_equal(from_file, grid("--ema-weights", str(in_process)))
    assert not np.array_equal(from_file, grid())  # the checkpoint's EMA: other weights

    # --sweep: one file per length, each that length's reconstruction; --step: an earlier one
    run_cli("ema", "--run", str(posthoc_run), "--sweep", "0.05,0.08", "--step", "8", "--out",
            str(tmp_path / "sweep"))
    snapshots = runs.posthoc_snapshots(posthoc_run, 8)
    assert [s.step for s in snapshots] == [4, 8]
    for sigma_rel in (0.05, 0.08):
        got = torch.load(tmp_path / "sweep" / f"ema-sigma{sigma_rel:g}-step00000008.pt",
                         weights_only=True)
        want, _ = runs.posthoc_ema(snapshots, sigma_rel, 8)
        assert all(torch.equal(got[k], want[k]) for k in want)
    # 0.05 was tracked: its step-8 snapshot exactly (buffers and all)
    tracked = snapshots[-1].emas[0]
    got = torch.load(tmp_path / "sweep" / "ema-sigma0.05-step00000008.pt", weights_only=True)
    for k in tracked:
        torch.testing.assert_close(got[k], tracked[k], rtol=1e-5, atol=1e-7)


def test_fid_and_the_export_score_and_write_the_reconstructed_ema(
        posthoc_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    """fid --ema-weights scores exactly the images sample --out-npz --ema-weights writes, and
    they are not the checkpoint EMA's."""
    weights = tmp_path / "w.pt"
    run_cli("ema", "--run", str(posthoc_run), "--sigma-rel", "0.08", "--out", str(weights))
    sample_set = ["--num-samples", "6", "--batch-size", "3", "--sampler", "ddim", "--steps", "3",
                  "--guidance", "2", "--seed", "1"]

    def fid(*flags: str) -> dict:
        proc = run_cli("fid", "--run", str(posthoc_run), *sample_set, "--data-root",
                       str(tiny_data), *flags)
        return json.loads(proc.stdout[proc.stdout.index("{"):])

    def npz_digest(*flags: str) -> str:
        out = tmp_path / f"s{len(list(tmp_path.glob('s*.npz')))}.npz"
        run_cli("sample", "--run", str(posthoc_run), *sample_set, "--out-npz", str(out), *flags)
        nchw = np.load(out)["arr_0"].transpose(0, 3, 1, 2)
        chunks = "".join(hashlib.sha256(np.ascontiguousarray(nchw[lo:lo + 3]).tobytes())
                         .hexdigest() for lo in (0, 3))
        return hashlib.sha256(chunks.encode()).hexdigest()

    reconstructed, checkpoint_ema = fid("--ema-weights", str(weights)), fid()
    assert reconstructed["ema_weights"] == str(weights) and "ema_weights" not in checkpoint_ema
    assert reconstructed["samples_sha256"] == npz_digest("--ema-weights", str(weights))
    assert reconstructed["samples_sha256"] != checkpoint_ema["samples_sha256"]
    assert reconstructed["fid"] != checkpoint_ema["fid"]


def one_line_error(proc: subprocess.CompletedProcess, starts: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {starts}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("flags", "starts"), [
    (["--sigma-rel", "0.3"], "--sigma-rel=0.3 must be in (0, 0.2887]"),
    (["--sigma-rel", "0"], "--sigma-rel=0.0 must be in (0, 0.2887]"),
    (["--sweep", "0.05,abc"], "--sweep 0.05,abc: list numbers separated by commas"),
    (["--sweep", "0.05,0.5"], "--sweep=0.5 must be in (0, 0.2887]"),
    ([], "ema makes --sigma-rel S (one file, --out weights.pt) or --sweep"),
    (["--sigma-rel", "0.1", "--sweep", "0.05"], "ema makes --sigma-rel S"),
    (["--sigma-rel", "0.1", "--step", "0"], "--step=0 must be >= 1"),
    (["--sigma-rel", "0.1", "--step", "5"], "--step 5: no snapshot of that step in"),
    (["--sigma-rel", "0.1", "--out", "TMP/w.png"], "--out TMP/w.png: name a .pt file"),
    (["--sweep", "0.1", "--out", "TMP/w.pt"], "--out TMP/w.pt: with --sweep, name a folder"),
])
def test_bad_ema_flags_are_one_line(posthoc_run: Path, tmp_path: Path, flags: list[str],
                                    starts: str) -> None:
    flags = [f.replace("TMP", str(tmp_path)) for f in flags]
    out = [] if "--out" in flags else ["--out", str(tmp_path / "w.pt")]
    one_line_error(run_cli("ema", "--run", str(posthoc_run), *flags, *out, check=False),
                   starts.replace("TMP", str(tmp_path)))


def test_runs_without_snapshots_and_misfit_weights_are_one_line(posthoc_run: Path,
                                                                tmp_path: Path) -> None:
    one_line_error(run_cli("ema", "--run", str(tmp_path), "--sigma-rel", "0.1", "--out",
                           str(tmp_path / "w.pt"), check=False),
                   f"no post-hoc EMA snapshots in {tmp_path / 'posthoc'}; train with "
                   "train.ema_posthoc=true")
    ema = final_state(posthoc_run)[Part.EMA]
    key = next(k for k, v in ema.items() if v.dim() == 4)
    wrong = dict(ema, **{key: torch.zeros(1, *ema[key].shape[1:])})
    torch.save(wrong, tmp_path / "wrong.pt")
    grid = ["--per-class", "1", "--out", str(tmp_path / "g.png")]
    for command, extra in (("sample", grid), ("fid", [])):
        one_line_error(run_cli(command, "--run", str(posthoc_run), "--ema-weights",
                               str(tmp_path / "wrong.pt"), *extra, check=False),
                       f"--ema-weights {tmp_path / 'wrong.pt'} does not fit this run's model: "
                       f"{key} is (1,")
    one_line_error(run_cli("sample", "--run", str(posthoc_run), "--ema-weights",
                           str(tmp_path / "none.pt"), *grid, check=False),
                   f"--ema-weights {tmp_path / 'none.pt'}: no such file")
    (tmp_path / "text.pt").write_text("not weights")
    one_line_error(run_cli("sample", "--run", str(posthoc_run), "--ema-weights",
                           str(tmp_path / "text.pt"), *grid, check=False),
                   f"--ema-weights {tmp_path / 'text.pt'} cannot be read (not a torch file)")
    torch.save({"weights": Path("code could run here")}, tmp_path / "object.pt")
    one_line_error(run_cli("sample", "--run", str(posthoc_run), "--ema-weights",
                           str(tmp_path / "object.pt"), *grid, check=False),
                   f"--ema-weights {tmp_path / 'object.pt'} holds objects other than tensors")
    one_line_error(run_cli("sample", "--run", str(posthoc_run), "--ema-weights",
                           str(tmp_path / "wrong.pt"), "--no-ema", *grid, check=False),
                   "--ema-weights replaces the EMA weights; drop --no-ema")
