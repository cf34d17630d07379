"""A trained run read back from its run directory: the checkpoint a command uses (named, or the
newest readable one), and the config, denoiser, diffusion and class names it holds; EMA weights
of other lengths made from its post-hoc snapshots."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ddp_diffusion import checkpoint, posthoc, rundir
from ddp_diffusion.config import Config, from_dict
from ddp_diffusion.diffusion import ConditionalDenoiser, Diffusion, build_denoiser
from ddp_diffusion.errors import CheckpointError, UserError
from ddp_diffusion.sources import CLASS_NAMES


def find_checkpoint(run_dir: Path, ckpt_path: Path | None) -> tuple[Path, dict]:
    """The checkpoint a command reads: `ckpt_path`, or the newest readable one of the run."""
    if ckpt_path is not None:
        if not ckpt_path.is_file():
            raise UserError(f"--checkpoint {ckpt_path}: no such file")
        try:
            return ckpt_path, checkpoint.read(ckpt_path)
        except CheckpointError as e:
            raise UserError(str(e)) from None
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the out_dir of a run")
    ckpt_dir = run_dir / rundir.CHECKPOINTS
    found, failures = checkpoint.newest_readable(ckpt_dir)
    if found is None:
        if failures:
            raise UserError(checkpoint.none_readable(ckpt_dir, failures))
        raise UserError(f"no checkpoints in {ckpt_dir}; train first (ddp-diffusion train "
                        f"out_dir={run_dir})")
    return found


class Run(NamedTuple):
    """A trained run, as a checkpoint holds it."""

    cfg: Config
    denoiser: ConditionalDenoiser
    diffusion: Diffusion
    step: int
    class_names: tuple[str, ...]


def _load_tensors(path: Path, what: str, fix: str, mmap: bool = False) -> dict[str, Any]:
    """A file of tensors and plain values (weights_only=True), or a one-line UserError."""
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # bytes that are no torch file at all
            raise UserError(f"{what} {path} cannot be read (not a torch file); {fix}") from None
        raise UserError(f"{what} {path} holds objects other than tensors and plain values "
                        f"(refused by a weights_only load); {fix}") from None
    except Exception as e:  # truncated, corrupt, not a torch file: many exception types
        raise UserError(f"{what} {path} cannot be read ({type(e).__name__}); {fix}") from None
    if not isinstance(state, dict):
        raise UserError(f"{what} {path} is not a state dict; {fix}")
    return state


def check_fits(weights: dict[str, Any], model: dict[str, torch.Tensor], what: str, fix: str
               ) -> None:
    """Raise a one-line UserError (`what` says whose model, `fix` how to mend it) unless
    `weights` has the model's tensors, shape for shape."""
    missing = sorted(model.keys() - weights.keys())
    extra = sorted(weights.keys() - model.keys())
    wrong = [k for k in model if k in weights and (
        not isinstance(weights[k], torch.Tensor) or weights[k].shape != model[k].shape)]
    if missing or extra or wrong:
        detail = (f"it lacks {missing[0]} ({len(missing)} missing)" if missing
                  else f"it has {extra[0]}, which the model has not ({len(extra)} such)" if extra
                  else f"{wrong[0]} is {tuple(getattr(weights[wrong[0]], 'shape', ()))} there, "
                       f"{tuple(model[wrong[0]].shape)} in the model ({len(wrong)} such)")
        raise UserError(f"{what}: {detail}; {fix}")


def load_run(run_dir: Path, ckpt_path: Path | None, use_ema: bool | None, device: torch.device,
             ema_weights: Path | None = None) -> Run:
    """Config, denoiser (EMA or raw weights; None: the run's sample.use_ema; or the weights in
    the file `ema_weights`, as `ema` writes them), diffusion, step and class names of a run's
    checkpoint."""
    _, state = find_checkpoint(run_dir, ckpt_path)
    cfg = from_dict(state["config"])
    ema = cfg.sample.use_ema if use_ema is None else use_ema
    names = tuple(state[checkpoint.Part.DATA].get("class_names", CLASS_NAMES))
    if ema_weights is not None:
        weights = _load_tensors(ema_weights, "--ema-weights", "write it with ddp-diffusion ema")
        return run_with(cfg, weights, int(state["step"]), names, device,
                        f"--ema-weights {ema_weights} does not fit this run's model",
                        "write it from this run with ddp-diffusion ema --run RUN")
    return run_with(cfg, state[checkpoint.Part.EMA] if ema else state[checkpoint.Part.MODEL],
                    int(state["step"]), names, device)


def run_with(cfg: Config, weights: dict[str, Any], step: int, names: tuple[str, ...],
             device: torch.device, what: str | None = None, fix: str = "") -> Run:
    """A Run of cfg's network holding `weights`, on `device`; weights from outside a checkpoint
    are first checked against the model, shape for shape (a misfit is one line: `what` did not
    fit, then the details, then `fix`)."""
    diffusion = Diffusion(cfg.diffusion)
    denoiser = build_denoiser(cfg.model, diffusion.num_timesteps)
    if what is not None:
        check_fits(weights, denoiser.state_dict(), what, fix)
    denoiser.load_state_dict(weights)
    return Run(cfg, denoiser.to(device).eval(), diffusion, step, names)


class Snapshot(NamedTuple):
    """A post-hoc EMA snapshot file, its tensors memory-mapped (read as they are used)."""

    step: int
    sigma_rels: list[float]
    gammas: list[float]
    emas: list[dict[str, torch.Tensor]]


def posthoc_snapshots(run_dir: Path, step: int | None) -> list[Snapshot]:
    """The run's post-hoc EMA snapshots up to `step` (None: the newest), which must be one of
    theirs: the weights after the last snapshot before it are in none of them."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the out_dir of a run")
    found = rundir.list_snapshots(run_dir)
    if not found:
        raise UserError(f"no post-hoc EMA snapshots in {run_dir / rundir.POSTHOC}; train with "
                        "train.ema_posthoc=true")
    steps = [s for s, _ in found]
    step = steps[-1] if step is None else step
    if step not in steps:
        raise UserError(f"--step {step}: no snapshot of that step in {run_dir / rundir.POSTHOC} "
                        f"(it holds {len(steps)}, of steps {steps[0]} to {steps[-1]}; the "
                        f"nearest: {min(steps, key=lambda s: abs(s - step))})")
    fix = "move it out of the folder to reconstruct from the others"
    out = []
    for s, path in found:
        if s > step:
            break
        state = _load_tensors(path, "post-hoc snapshot", fix, mmap=True)
        try:
            snap = Snapshot(int(state["step"]), [float(v) for v in state["sigma_rels"]],
                            [float(v) for v in state["gammas"]], list(state["emas"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"post-hoc snapshot {path} lacks its step, lengths or weights; "
                            f"{fix}") from None
        if snap.step != s or not len(snap.sigma_rels) == len(snap.gammas) == len(snap.emas):
            raise UserError(f"post-hoc snapshot {path} is not of step {s} or its lists differ "
                            f"in length; {fix}")
        out.append(snap)
    return out


def posthoc_ema(snapshots: list[Snapshot], sigma_rel: float, step: int
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The EMA of length `sigma_rel` at `step` from snapshots up to it: its weights (as the
    checkpoint's EMA part) and how it was made (coefficients, the profile's relative error)."""
    pairs = [(g, snap.step) for snap in snapshots for g in snap.gammas]
    x = posthoc.solve_coefficients(pairs, sigma_rel, step)
    weights = posthoc.reconstruct((ema for snap in snapshots for ema in snap.emas), x)
    return weights, {"sigma_rel": sigma_rel, "gamma": posthoc.sigma_rel_to_gamma(sigma_rel),
                     "step": step, "snapshots": len(snapshots), "profile_error":
                     posthoc.fit_error(pairs, x, sigma_rel, step),
                     "coefficients": {f"{snap.step}/{s!r}": c for (snap, s), c in zip(
                         ((sn, s) for sn in snapshots for s in sn.sigma_rels), x, strict=True)}}
