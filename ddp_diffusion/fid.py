"""FID with torchmetrics: feature extractors, cached reference statistics, distributed sampling.

The generated set is split into fixed chunks of ``batch_size`` images; chunk c has the labels
``range(c*B, (c+1)*B) % num_classes`` and the seed ``(seed, c)``, and rank r draws the chunks
r, r+W, r+2W, ... So the whole sample set is the same for any world size W. Every rank updates
its torchmetrics ``FrechetInceptionDistance`` with its images and every rank calls
``compute()``, which sums the metric's statistics over ranks (a collective). The reference
(real) statistics are loaded on rank 0 only, so the summed statistics equal those of one
process.

Paths are the user's: the ``fid`` command takes the model, the data's identity (dataset,
channels, classes) and the sampling settings from a checkpoint's config, never a path. Where it
reads data and writes the reference-statistics cache (``--data-root``, default ``data``), an
image folder's images (``--data-path``) and the Inception weights (``--inception-weights``, else
the torch hub cache) come from its flags or their defaults; ``data.download`` and
``data.debian_dir`` take their defaults. A checkpoint may come from anyone, or from another
machine, and must not choose which files are read or written here; one log line names the
paths of its config that were not used. (``sample`` uses none of them either: it reads the run's
checkpoint and writes --out.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ddp_diffusion import distributed, files
from ddp_diffusion.classifier import FashionClassifier, load_classifier
from ddp_diffusion.config import (
    Config,
    DataConfig,
    FidConfig,
    check_features,
    check_fid,
    has_fashion_classifier,
)
from ddp_diffusion.diffusion import ConditionalDenoiser, Diffusion
from ddp_diffusion.errors import UserError
from ddp_diffusion.sample import SampleSet
from ddp_diffusion.seeds import derive_seed
from ddp_diffusion.sources import open_source

log = logging.getLogger("ddp_diffusion")

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_FILE)
# What evaluate() measures (training logs these to metrics.jsonl and W&B).
METRICS = ("fid", "class_accuracy", "kid", "kid_std", "precision", "recall")
REAL_FEATURES = "real_features"  # kept with the statistics: KID and precision/recall need them
REAL_KEPT = 50_000  # at most this many real images' features (a seeded random subset)
KID_SUBSETS, KID_SUBSET = 100, 1000  # torch-fidelity's defaults
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class FashionFeatures(nn.Module):
    """The shipped classifier's penultimate features of uint8 (N, 1, 32, 32) images."""

    def __init__(self, classifier: FashionClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> FashionFeatures:
        """Stay in eval mode (BatchNorm running statistics, no dropout)."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images)


class InceptionFeatures(nn.Module):
    """torchmetrics' 2048-d InceptionV3 (torch-fidelity weights) with greyscale as 3 channels."""

    num_features = 2048

    def __init__(self, weights: Path) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        state = checked_weights(weights)
        # torch-fidelity torch.loads what it is given with weights_only=False: it gets these
        # checked tensors, serialised here, never the file (which may have been replaced since).
        tensors = io.BytesIO()
        torch.save(state, tensors)
        tensors.seek(0)
        try:
            self.inception = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=[str(self.num_features)],
                feature_extractor_weights_path=tensors)  # type: ignore[arg-type]  # a file
        except RuntimeError as e:
            raise UserError(f"{weights} does not hold InceptionV3 FID weights "
                            f"({str(e).splitlines()[0]})") from None

    def forward(self, images: Tensor) -> Tensor:
        return self.inception(images.expand(-1, 3, -1, -1))


def checked_weights(path: Path) -> dict[str, Tensor]:
    """A weights file's state dict: its bytes read once and loaded with weights_only=True, so
    what is used is what was checked."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"{path} is not a loadable weights file ({str(e).splitlines()[0]}); "
                        f"download it again from {INCEPTION_URL}") from None
    if not (isinstance(state, dict) and all(type(v) is Tensor for v in state.values())):
        raise UserError(f"{path} holds no state dict of tensors; download it again from "
                        f"{INCEPTION_URL}")
    return state


def inception_weights(path: str | Path | None) -> Path:
    """The InceptionV3 weights file: PATH, or the torch hub cache (downloaded when online)."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"fid.inception_weights: {p} does not exist; download {INCEPTION_URL}")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
        except OSError as e:
            raise UserError(
                f"--features inception needs the InceptionV3 weights {INCEPTION_FILE}, which are "
                f"not in {cached.parent} and could not be downloaded ({type(e).__name__}): fetch "
                f"{INCEPTION_URL} on a machine with internet and copy it to {cached}, or pass "
                "its path with --inception-weights PATH (config: fid.inception_weights)") from None
    return cached


def build_extractor(features: str, weights: str | Path | None = None) -> nn.Module:
    """The feature module torchmetrics gets through `feature=`: 'fashion' or 'inception'."""
    if features == "fashion":
        return FashionFeatures(load_classifier())
    if features == "inception":
        return InceptionFeatures(inception_weights(weights))
    raise UserError(f"unknown FID features {features!r}; use fashion or inception")


def checksum(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RankFID(FrechetInceptionDistance):
    """torchmetrics' FID on a rank that may have no images to add.

    With more ranks than sample chunks, a rank generates nothing and never calls update(),
    which is where torchmetrics records the dtype compute() returns in (compute() then fails
    on that rank). Its zero statistics are right as they are for the sum over ranks; only that
    dtype needs a default: our extractors' features are float32.
    """

    orig_dtype = torch.float32


def new_metric(extractor: nn.Module, sync: bool = True) -> FrechetInceptionDistance:
    """torchmetrics' FID on a custom extractor; it keeps the real statistics across resets, and
    compute() sums the statistics over ranks unless `sync` is off."""
    metric = RankFID(feature=extractor, reset_real_features=False, sync_on_compute=sync)
    return metric.to(next(extractor.parameters()).device)


@dataclass
class Reference:
    """Sufficient statistics of the real images of one split, as torchmetrics accumulates them."""

    states: dict[str, Tensor]
    path: Path
    cached: bool  # loaded from disk, not computed

    @property
    def num_samples(self) -> int:
        return int(self.states["real_features_num_samples"])


def reference_stats(extractor: nn.Module, data: DataConfig, split: str, image_size: int,
                    batch_size: int = 500) -> Reference:
    """Real statistics of the run's data (a split of a torchvision set, or the image folder) at
    the model's size, cached under data.root/fid_reference/ by data, size and extractor."""
    if split not in ("train", "test"):
        raise UserError(f"unknown FID reference {split!r}; use train or test")
    source = open_source(data, image_size, data.num_workers, train=split == "train")
    key = hashlib.sha256(f"{source.dataset}:{split}:{source.fingerprint}:{source.content}:"
                         f"{image_size}:{checksum(extractor)}:features".encode()).hexdigest()
    path = Path(data.root) / "fid_reference" / f"{source.dataset}-{split}-{key[:24]}.pt"
    if path.is_file():
        try:
            states = torch.load(path, map_location="cpu", weights_only=True)
            return Reference(states, path, cached=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError):
            log.warning("FID reference cache %s is unreadable; recomputing it", path)
    metric = new_metric(extractor)
    rows, kept, seen = real_rows(len(source)), None, 0
    with torch.no_grad(), captured_features(extractor) as features:
        for images in source.batches(batch_size, data.num_workers):
            metric.update(images.to(metric.device), real=True)
            batch, at = features.pop(), rows[seen:seen + len(images)]
            if kept is None:
                kept = torch.empty(min(len(source), REAL_KEPT), batch.shape[1])
            kept[at[at < len(kept)]] = batch[at < len(kept)]
            seen += len(images)
    states = {k: getattr(metric, k).cpu() for k in REAL_STATES}
    states[REAL_FEATURES] = kept
    # Whole or not at all: concurrent runs never read half a file.
    files.write_atomic(path, lambda f: torch.save(states, f))
    log.info("FID reference statistics of %d %s %s images cached in %s", len(source),
             source.dataset, split, path)
    return Reference(states, path, cached=False)


def real_rows(n: int) -> Tensor:
    """Where each of n real images' features go in the stored REAL_FEATURES: a seeded random
    order, so that any prefix is a random subset; images at REAL_KEPT or beyond are not kept."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(0, "fid-real")))
    return torch.empty(n, dtype=torch.long).index_copy_(0, order, torch.arange(n))


@contextlib.contextmanager
def captured_features(extractor: nn.Module) -> Iterator[list[Tensor]]:
    """The features the extractor computes for the metric (float32, on the CPU), appended to a
    list as it runs: FID's torchmetrics update() computes them once for all the metrics."""
    out: list[Tensor] = []
    hook = extractor.register_forward_hook(
        lambda _module, _inputs, features: out.append(features.detach().float().cpu()))
    try:
        yield out
    finally:
        hook.remove()


def generated_features(denoiser: ConditionalDenoiser, diffusion: Diffusion, cfg: Config,
                       samples: SampleSet, chunks: Iterable[int], extractor: nn.Module,
                       update: Callable[[Tensor], object]
                       ) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """Each chunk of `samples` generated, then scored by `update` (the metric's update, or the
    extractor alone): the chunk's index, labels, pixels and the features `update` computed."""
    with captured_features(extractor) as features:
        for chunk in chunks:
            labels, pixels = samples.pixels(denoiser, diffusion, chunk, cfg.model.image_size,
                                            cfg.model.in_channels)
            with torch.no_grad():
                update(pixels)
            yield chunk, labels, pixels, features.pop()


def kid_and_precision_recall(generated: Tensor, real: Tensor, seed: int) -> dict[str, float]:
    """KID (the mean of torch-fidelity's unbiased MMD^2 over 100 subsets of up to 1000, with
    the standard deviation over subsets) and precision and recall (Kynkäänniemi et al. 2019,
    3 nearest neighbours, torch-fidelity) of generated against real features. Precision and
    recall compare equal numbers: the first len(generated) real ones (a random subset)."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    size = min(KID_SUBSET, len(generated), len(real))
    kid = kid_features_to_metric(generated, real, kid_subsets=KID_SUBSETS,
                                 kid_subset_size=size, rng_seed=seed % 2**32, verbose=False)
    prc = prc_features_to_metric(generated, real[:len(generated)], prc_neighborhood=3,
                                 prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return {"kid": kid["kernel_inception_distance_mean"],
            "kid_std": kid["kernel_inception_distance_std"],
            "precision": prc["precision"], "recall": prc["recall"]}


def mean_and_cov(states: dict[str, Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """mu and sigma (float64) of a metric's real statistics, as torchmetrics' compute() forms
    them: sigma with the n - 1 denominator (numpy.cov's)."""
    n = states["real_features_num_samples"].double()
    mu = states["real_features_sum"].double() / n
    sigma = (states["real_features_cov_sum"].double() - n * torch.outer(mu, mu)) / (n - 1)
    return mu.numpy(), sigma.numpy()


def write_stats(path: Path, ref: Reference, about: dict[str, str | int]) -> Path:
    """Real statistics as an .npz of mu, sigma (pytorch-fid's and the ADM suite's names) and
    num_samples, with `about` (features, dataset, ...) as strings beside them."""
    mu, sigma = mean_and_cov(ref.states)
    arrays = {"mu": mu, "sigma": sigma, "num_samples": np.int64(ref.num_samples),
              **{k: np.str_(v) for k, v in about.items()}}
    return files.write_atomic(path, lambda f: np.savez(f, **arrays))


def reference_file(cfg: Config, out: Path) -> str:
    """Write the real statistics of cfg's data (split fid.reference, features fid.features, at
    model.image_size) to an .npz (write_stats); what was written, in words."""
    fc = cfg.fid
    extractor = build_extractor(fc.features, fc.inception_weights)
    ref = reference_stats(extractor, cfg.data, fc.reference, cfg.model.image_size)
    write_stats(out, ref, {"features": fc.features, "dataset": cfg.data.dataset,
                           "split": fc.reference, "image_size": cfg.model.image_size,
                           "extractor_sha256": checksum(extractor)})
    return (f"wrote {out}: mu and sigma of {ref.num_samples} {cfg.data.dataset} {fc.reference} "
            f"images at {cfg.model.image_size}x{cfg.model.image_size}, {fc.features} features "
            f"({extractor.num_features}-d)")


def read_stats(path: Path, features: str, num_features: int) -> Reference:
    """Real statistics from an .npz of mu and sigma (ours, pytorch-fid's, the ADM suite's), as
    the states of a metric whose compute() gives back that mu and sigma. Without num_samples
    any n > 1 does: n only scales what compute() divides out again."""
    try:
        with np.load(path, allow_pickle=False) as z:
            found = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"--ref-stats {path} cannot be read as an .npz ({e})") from None
    mu, sigma = found.get("mu"), found.get("sigma")
    if mu is None or sigma is None:
        raise UserError(f"--ref-stats {path} has no mu and sigma (it holds "
                        f"{', '.join(sorted(found)) or 'nothing'}); write one with "
                        "ddp-diffusion fid-ref")
    if mu.shape != (num_features,) or sigma.shape != (num_features, num_features):
        raise UserError(f"--ref-stats {path} holds {mu.shape[0] if mu.ndim == 1 else mu.shape}-d "
                        f"statistics, but features {features} are {num_features}-d: use the "
                        f"features it was made with")
    if "features" in found and str(found["features"]) != features:
        raise UserError(f"--ref-stats {path} was made with features {found['features']}, not "
                        f"{features}: use --features {found['features']}")
    n = torch.tensor(float(found.get("num_samples", 2)), dtype=torch.float64)
    mu_t, sigma_t = torch.from_numpy(mu).double(), torch.from_numpy(sigma).double()
    states = {"real_features_sum": mu_t * n,
              "real_features_cov_sum": sigma_t * (n - 1) + n * torch.outer(mu_t, mu_t),
              "real_features_num_samples": n.long()}
    return Reference(states, path, cached=True)


def load_reference(extractor: nn.Module, cfg: Config, fc: FidConfig) -> Reference:
    """The real statistics FID compares with: fc.ref_stats, or those of the run's data."""
    if fc.ref_stats:
        return read_stats(Path(fc.ref_stats), fc.features, extractor.num_features)
    return reference_stats(extractor, cfg.data, fc.reference, cfg.model.image_size)


def set_reference(metric: FrechetInceptionDistance, states: dict[str, Tensor]) -> None:
    """Put real statistics into a metric (only on rank 0: compute() sums them over ranks)."""
    for k in REAL_STATES:
        setattr(metric, k, states[k].clone().to(metric.device))


def real_fid(cfg: Config, fc: FidConfig, split: str) -> dict[str, Any]:
    """FID of the first fc.num_samples real images of a split against fc.reference, in this
    process alone: with the other split, the floor a perfect model would score at this sample
    count and with these features, which a model's FID is to be read against."""
    extractor = build_extractor(fc.features, fc.inception_weights)
    metric = new_metric(extractor, sync=False)
    set_reference(metric, load_reference(extractor, cfg, fc).states)
    source = open_source(cfg.data, cfg.model.image_size, cfg.data.num_workers,
                         train=split == "train")
    if len(source) < fc.num_samples:
        raise UserError(f"the {split} split has {len(source)} images, fewer than the "
                        f"{fc.num_samples} asked for")
    seen = 0
    with torch.no_grad():
        for images in source.batches(fc.batch_size, cfg.data.num_workers):
            images = images[:fc.num_samples - seen]
            metric.update(images.to(metric.device), real=False)
            seen += len(images)
            if seen == fc.num_samples:
                break
    return {"fid": float(metric.compute()), "split": split,
            "reference": fc.ref_stats or fc.reference,
            "num_samples": seen, "features": fc.features}


def local_paths(cfg: Config, data_root: str, data_path: str | None, inception: str | None,
                ref_stats: str | None) -> Config:
    """A checkpoint's config with every path replaced by the fid command's flags or defaults
    (see the module docstring), and one log line naming those of the checkpoint not used."""
    default = DataConfig()
    if cfg.data.dataset == "image_folder" and not data_path:
        raise UserError(f"this run trained on an image folder ({cfg.data.path} in its "
                        "checkpoint): pass the folder with --data-path (paths in a checkpoint "
                        "are not used)")
    data = dataclasses.replace(cfg.data, root=data_root, path=data_path,
                               debian_dir=default.debian_dir, download=default.download)
    fc = dataclasses.replace(cfg.fid, inception_weights=inception, ref_stats=ref_stats)
    local = dataclasses.replace(cfg, data=data, fid=fc)
    unused = [f"{key}={value}" for key, value, used in (
        ("data.root", cfg.data.root, data.root), ("data.path", cfg.data.path, data.path),
        ("data.debian_dir", cfg.data.debian_dir, data.debian_dir),
        ("data.download", cfg.data.download, data.download),
        ("fid.inception_weights", cfg.fid.inception_weights, fc.inception_weights),
        ("fid.ref_stats", cfg.fid.ref_stats, fc.ref_stats))
        if value != used]
    if unused:
        log.info("not used from the checkpoint's config: %s (fid reads and writes only where "
                 "its flags say: --data-root %s%s)", ", ".join(unused), data_root,
                 f" --data-path {data_path}" if data_path else "")
    return local


def evaluate(denoiser: ConditionalDenoiser, diffusion: Diffusion, cfg: Config, fc: FidConfig,
             seed: int, precision: str = "fp32") -> dict[str, Any]:
    """FID (and, for Fashion-MNIST, class accuracy) of fc.num_samples generated images against
    the run's own data; call it on every rank."""
    check_fid(fc, diffusion.num_timesteps)
    fashion = has_fashion_classifier(cfg)
    check_features(cfg, fc.features, "--features")
    start = time.perf_counter()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(denoiser.parameters()).device
    extractor = build_extractor(fc.features, fc.inception_weights).to(device)
    classifier = None  # class accuracy is measured where a classifier exists, never faked
    if fashion:
        classifier = (extractor.classifier if isinstance(extractor, FashionFeatures)
                      else load_classifier().to(device))
    metric = new_metric(extractor)
    ref = None
    if rank == 0:
        ref = load_reference(extractor, cfg, fc)
        set_reference(metric, ref.states)

    t0 = time.perf_counter()
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total
    chunks: dict[int, tuple[str, Tensor]] = {}  # digest of the pixels, features
    samples = SampleSet(fc.num_samples, fc.batch_size, tuple(range(cfg.model.num_classes)),
                        fc.sampler, fc.steps, fc.guidance, cfg.sample.eta, seed, precision)
    for chunk, labels, pixels, features in generated_features(
            denoiser, diffusion, cfg, samples, range(rank, samples.num_chunks, world), extractor,
            lambda p: metric.update(p, real=False)):
        chunks[chunk] = (hashlib.sha256(pixels.cpu().numpy().tobytes()).hexdigest(), features)
        if classifier is not None:
            with torch.no_grad():
                counts += torch.stack([(classifier(pixels).argmax(1) == labels).sum().double(),
                                       torch.tensor(len(labels), dtype=torch.float64,
                                                    device=device)])
    # Sums of whole numbers: exact, so the accuracy is the same for any world size.
    counts = distributed.sum_across_ranks(counts)  # all ranks finished generating here
    gen_s = time.perf_counter() - t0
    fid = float(metric.compute())  # a collective: sums the statistics over ranks
    gathered = {k: v for d in distributed.all_gather_objects(chunks) for k, v in d.items()}
    joined = "".join(gathered[c][0] for c in sorted(gathered))
    more = None  # KID and precision/recall: on rank 0, from the real features it holds
    if ref is not None and REAL_FEATURES in ref.states:
        generated = torch.cat([gathered[c][1] for c in sorted(gathered)])
        more = kid_and_precision_recall(generated, ref.states[REAL_FEATURES],
                                        derive_seed(seed, "kid"))
    more = distributed.broadcast_object(more) or {}
    return {
        "fid": fid, **({"class_accuracy": float(counts[0] / counts[1])} if classifier else {}),
        **more,
        "num_samples": fc.num_samples, "features": fc.features,
        "reference": fc.ref_stats or fc.reference,
        "dataset": cfg.data.dataset,
        "reference_samples": ref.num_samples if ref else None,
        "reference_cached": ref.cached if ref else None,
        "sampler": fc.sampler, "steps": fc.steps, "guidance": fc.guidance,
        "eta": cfg.sample.eta, "seed": seed, "batch_size": fc.batch_size, "world_size": world,
        "sampling_precision": precision, "samples_per_s": fc.num_samples / gen_s,
        "wall_s": time.perf_counter() - start,
        "samples_sha256": hashlib.sha256(joined.encode()).hexdigest(),
    }
