"""Class-conditional sampling with CFG, deterministic per seed, and labelled PNG grids."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ddp_diffusion import files
from ddp_diffusion.classifier import to_uint8
from ddp_diffusion.diffusion import ConditionalDenoiser, Diffusion
from ddp_diffusion.errors import UserError
from ddp_diffusion.precision import autocast
from ddp_diffusion.seeds import derive_seed
from ddp_diffusion.sources import CLASS_NAMES, SHORT_NAMES

LABEL_WIDTH = 84  # pixels left of each grid row for the class name


def parse_classes(spec: str, names: tuple[str, ...] = CLASS_NAMES) -> list[int]:
    """'all', or comma-separated class names or indices of a run's data -> indices.

    Fashion-MNIST also answers to the code-along's short names (sneaker, purse, boot, ...).
    """
    if spec.strip().lower() == "all":
        return list(range(len(names)))
    shown = SHORT_NAMES if names == CLASS_NAMES else names
    lookup = {n.lower(): i for i, n in enumerate(names)}
    lookup.update({n: i for i, n in enumerate(shown)})
    lookup.update({str(i): i for i in range(len(names))})
    out = []
    for item in (s.strip().lower() for s in spec.split(",") if s.strip()):
        if item not in lookup:
            listed = ", ".join(shown[:20]) + (", ..." if len(shown) > 20 else "")
            raise UserError(f"unknown class '{item}'; use one of: all, {listed} "
                            f"(or 0..{len(names) - 1})")
        out.append(lookup[item])
    if not out:
        raise UserError(f"--classes '{spec}' names no class; use all, or names or indices such "
                        f"as {','.join(shown[:2])} or 0,1")
    return out


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG (the samplers draw their noise from it) and restore it afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate(denoiser: ConditionalDenoiser, diffusion: Diffusion, labels: torch.Tensor,
             sampler: str, steps: int, guidance: float, seed: int, eta: float = 0.0,
             precision: str = "fp32", image_size: int = 32, channels: int = 1) -> torch.Tensor:
    """Images in [-1, 1] for the given labels; the same seed and labels give the same pixels."""
    device = next(denoiser.parameters()).device
    was_training = denoiser.training
    denoiser.eval()
    module = diffusion.sampler(denoiser, sampler, steps, guidance, eta)
    try:
        with seeded(derive_seed(seed, "sample"), device), autocast(device, precision):
            x = torch.randn(len(labels), channels, image_size, image_size, device=device)
            images = module(x, conditional_inputs=denoiser.condition(labels.to(device)))
    finally:
        denoiser.train(was_training)
    return images.float().clamp(-1, 1)


# Pillow refuses to open an image of more pixels than this (DecompressionBombError), and so do
# many viewers: a grid is kept below it, which also bounds its memory (3 bytes a pixel, 0.5 GiB).
MAX_GRID_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
MAX_SIDE = {"JPEG": 65535, "WEBP": 16383, "GIF": 65535}  # pixels a side a format can store


def grid_size(rows: int, per_class: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels of a labelled grid: 2-pixel gaps, LABEL_WIDTH for the names."""
    tile = image_size + 2
    return LABEL_WIDTH + per_class * tile + 2, rows * tile + 2


def check_grid(rows: int, per_class: int, image_size: int, path: Path) -> None:
    """Raise UserError for a grid that its image file cannot hold or Pillow would not open."""
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    side = MAX_SIDE.get(fmt, 2**31 - 1)
    width, height = grid_size(rows, per_class, image_size)
    if width <= side and width * height <= MAX_GRID_PIXELS:
        return
    tile = image_size + 2
    fit = min(side, MAX_GRID_PIXELS // height) - LABEL_WIDTH - 2
    fix = (f"use --per-class {fit // tile} or fewer" if fit >= tile and height <= side
           else "use fewer --classes")
    raise UserError(f"--per-class {per_class}: a grid of {rows} classes x {per_class} images is "
                    f"{width}x{height} pixels, more than {fmt} allows ({side} a side) or Pillow "
                    f"opens ({MAX_GRID_PIXELS} pixels); {fix}")


class Grid:
    """A labelled grid image (one row of `per_class` tiles per name), filled chunk by chunk."""

    def __init__(self, row_names: list[str] | tuple[str, ...], per_class: int, image_size: int,
                 channels: int) -> None:
        width, height = grid_size(len(row_names), per_class, image_size)
        shape = (height, width, 3) if channels == 3 else (height, width)
        self.pixels = np.full(shape, 255, dtype=np.uint8)  # white gaps and label column
        self.row_names = row_names
        self.per_class = per_class

    def add(self, images: torch.Tensor, start: int) -> None:
        """Place images in [-1, 1] at flat positions start, start + 1, ... (row-major)."""
        # The same float steps as make_grid's (x + 1) / 2, then * 255 and round: the same bytes.
        tiles = ((images + 1) / 2 * 255).round().byte().cpu().permute(0, 2, 3, 1).numpy()
        tile = images.shape[-1] + 2
        for i, pixels in enumerate(tiles, start):
            y, x = 2 + (i // self.per_class) * tile, LABEL_WIDTH + 2 + (i % self.per_class) * tile
            self.pixels[y:y + tile - 2, x:x + tile - 2] = pixels if pixels.shape[2] == 3 else (
                pixels[:, :, 0])

    def save(self, path: Path) -> Path:
        """Write the image (format from the suffix) atomically; WriteFailed names the path."""
        canvas = Image.fromarray(self.pixels)
        draw = ImageDraw.Draw(canvas)
        tile = (canvas.height - 2) // len(self.row_names)
        for row, name in enumerate(self.row_names):
            draw.text((4, row * tile + tile // 2 - 5), name[:14], fill="black")
        fmt = Image.registered_extensions()[path.suffix.lower()]
        return files.write_atomic(path, lambda f: canvas.save(f, format=fmt))


def save_grid(images: torch.Tensor, row_names: list[str] | tuple[str, ...], per_class: int,
              path: Path) -> Path:
    """An image file with one labelled row of `per_class` images per name (greyscale or RGB)."""
    grid = Grid(row_names, per_class, images.shape[-1], images.shape[1])
    grid.add(images, 0)
    return grid.save(path)


def generate_grid(denoiser: ConditionalDenoiser, diffusion: Diffusion, classes: list[int],
                  row_names: list[str], per_class: int, sampler: str, steps: int,
                  guidance: float, seed: int, eta: float, precision: str, image_size: int,
                  channels: int, chunk: int) -> Grid:
    """`per_class` images of each class, generated `chunk` at a time into a Grid (memory stays
    flat for any grid size).

    The first chunk is seeded as one batch always was, so a grid of up to `chunk` images is the
    same as before chunking; chunk c > 0 draws from its own seed (seed, c).
    """
    device = next(denoiser.parameters()).device
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class)
    grid = Grid(row_names, per_class, image_size, channels)
    for c, lo in enumerate(range(0, len(labels), chunk)):
        grid.add(generate(denoiser, diffusion, labels[lo:lo + chunk], sampler, steps, guidance,
                          seed=derive_seed(seed, "chunk", c) if c else seed, eta=eta,
                          precision=precision, image_size=image_size, channels=channels), lo)
    return grid


@dataclass(frozen=True)
class SampleSet:
    """num_samples generated images in chunks of batch_size that any world size draws alike:
    image i asks for classes[i % len(classes)] and chunk c draws from the seed (seed, "fid", c),
    so rank r may draw chunks r, r + W, ... in any order. fid scores this set and
    `sample --out-npz` exports it: with the same settings, the same images."""

    num_samples: int
    batch_size: int
    classes: tuple[int, ...]
    sampler: str
    steps: int
    guidance: float
    eta: float
    seed: int
    precision: str

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self, chunk: int) -> range:
        """The images of one chunk."""
        return range(chunk * self.batch_size,
                     min((chunk + 1) * self.batch_size, self.num_samples))

    def labels(self, chunk: int) -> torch.Tensor:
        """The class each image of a chunk asks for."""
        index = torch.tensor(self.indices(chunk))
        return torch.tensor(self.classes)[index % len(self.classes)]

    def pixels(self, denoiser: ConditionalDenoiser, diffusion: Diffusion, chunk: int,
               image_size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's labels and images, uint8 (n, channels, size, size), on the model's device."""
        labels = self.labels(chunk).to(next(denoiser.parameters()).device)
        images = generate(denoiser, diffusion, labels, self.sampler, self.steps, self.guidance,
                          seed=derive_seed(self.seed, "fid", chunk), eta=self.eta,
                          precision=self.precision, image_size=image_size, channels=channels)
        return labels, to_uint8(images)
