"""Generated images written as evaluation suites read them.

``.npz``: ``arr_0`` uint8 (N, H, W, C) and ``arr_1`` int64 labels (N,), the layout of
guided-diffusion's ``image_sample.py`` that the ADM evaluation suite (and DiT's
``sample_ddp.py``) reads. A folder: ``000000.png``, ``000001.png``, ... and ``dataset.json``
with their labels, the layout of EDM's ``dataset_tool.py``.

The images are a sample.SampleSet, the set fid scores: the same for any world size. Every rank
writes each chunk as it finishes (``OUT.npz.parts/chunk-000012.npy``, or the chunk's PNGs), so
memory stays at one chunk and an interrupted export resumes by skipping the chunks on disk. The
.npz is then streamed together from the chunk files, which are removed after. A
``manifest.json`` beside the chunks records the settings; chunks of other settings are never
mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from ddp_diffusion import distributed, files
from ddp_diffusion.diffusion import ConditionalDenoiser, Diffusion
from ddp_diffusion.distributed import DistEnv
from ddp_diffusion.errors import UserError
from ddp_diffusion.sample import SampleSet

MANIFEST = "manifest.json"
LABELS = "dataset.json"  # EDM's name and layout: {"labels": [["000000.png", 3], ...]}


def work_dir(out: Path) -> Path:
    """Where the chunks go: beside an .npz, or the PNG folder itself."""
    return out.with_name(f"{out.name}.parts") if out.suffix == ".npz" else out


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def chunk_path(out: Path, chunk: int) -> Path:
    """An .npz export's file of one chunk."""
    return work_dir(out) / f"chunk-{chunk:06d}.npy"


def all_labels(samples: SampleSet) -> list[int]:
    """The class of every image of the set, in order."""
    return torch.cat([samples.labels(c) for c in range(samples.num_chunks)]).tolist()


def claim(out: Path, settings: dict[str, Any]) -> None:
    """Make the work folder ours for these settings (rank 0). Chunks written with other
    settings, or a folder that is not an export, are refused with one line."""
    work = work_dir(out)
    manifest = work / MANIFEST
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items()
                   if saved.get(k) != v]
        if changed:
            raise UserError(f"{work} holds an unfinished export with other settings "
                            f"({'; '.join(changed)}): delete it to start again, or export "
                            "to another path")
        return
    if work.is_dir() and any(work.iterdir()):
        what = "a finished export" if (work / LABELS).is_file() else "no export of ours"
        raise UserError(f"--out-dir {out} is not empty and holds {what}: name a new or empty "
                        "folder")
    work.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(manifest, json.dumps(settings, indent=1))


def chunk_done(out: Path, samples: SampleSet, chunk: int, shape: tuple[int, ...]) -> bool:
    """Whether a chunk is on disk whole (files are written atomically, so whole if present)."""
    work = work_dir(out)
    if out.suffix != ".npz":
        return all((work / png_name(i)).is_file() for i in samples.indices(chunk))
    try:
        found = np.load(chunk_path(out, chunk), mmap_mode="r").shape
    except (OSError, ValueError):
        return False
    return found == (len(samples.indices(chunk)), *shape)


def write_chunk(out: Path, samples: SampleSet, chunk: int, pixels: np.ndarray) -> None:
    """One chunk's uint8 (n, H, W, C) images: a chunk file, or one PNG each."""
    work = work_dir(out)
    if out.suffix == ".npz":
        files.write_atomic(chunk_path(out, chunk), lambda f: np.save(f, pixels))
        return
    for i, image in zip(samples.indices(chunk), pixels, strict=True):
        canvas = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        files.write_atomic(work / png_name(i), lambda f, c=canvas: c.save(f, format="PNG"))


def stream_npz(f: BinaryIO, out: Path, samples: SampleSet, shape: tuple[int, ...]) -> None:
    """arr_0 (all images) and arr_1 (labels) into an .npz, one chunk file in memory at a time."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as a:
            np.lib.format.write_array_header_1_0(a, {
                "descr": "|u1", "fortran_order": False, "shape": (samples.num_samples, *shape)})
            for c in range(samples.num_chunks):
                a.write(np.load(chunk_path(out, c)).tobytes())
        with z.open("arr_1.npy", "w") as b:
            np.lib.format.write_array(b, np.array(all_labels(samples), dtype=np.int64))


def finish(out: Path, samples: SampleSet, shape: tuple[int, ...]) -> None:
    """Rank 0, once every chunk is on disk: the .npz (then its chunks go), or dataset.json."""
    if out.suffix == ".npz":
        files.write_atomic(out, lambda f: stream_npz(f, out, samples, shape))
        shutil.rmtree(work_dir(out))
        return
    files.write_text_atomic(out / LABELS, json.dumps(
        {"labels": [[png_name(i), c] for i, c in enumerate(all_labels(samples))]}))
    (out / MANIFEST).unlink()


def export(denoiser: ConditionalDenoiser, diffusion: Diffusion, samples: SampleSet,
           image_size: int, channels: int, out: Path, identity: dict[str, Any], env: DistEnv
           ) -> dict[str, Any]:
    """Generate this rank's missing chunks of `samples` into `out` (call it on every rank); a
    summary of what was done."""
    shape = (image_size, image_size, channels)
    settings = {**identity, **dataclasses.asdict(samples), "image_shape": list(shape)}
    settings["classes"] = list(samples.classes)
    # A collective: the folder and its manifest exist before any rank writes.
    distributed.run_on_main(env.is_main, lambda: claim(out, settings))
    counts = torch.zeros(2, dtype=torch.long)  # generated, found on disk
    for chunk in range(env.rank, samples.num_chunks, env.world_size):
        if chunk_done(out, samples, chunk, shape):
            counts[1] += 1
            continue
        _, pixels = samples.pixels(denoiser, diffusion, chunk, image_size, channels)
        write_chunk(out, samples, chunk, pixels.permute(0, 2, 3, 1).cpu().numpy())
        counts[0] += 1
    counts = distributed.sum_across_ranks(counts.to(env.device)).cpu()  # all chunks written
    distributed.run_on_main(env.is_main, lambda: finish(out, samples, shape))
    return {"out": str(out), "chunks": samples.num_chunks, "chunks_generated": int(counts[0]),
            "chunks_reused": int(counts[1]), "world_size": env.world_size, **settings}
