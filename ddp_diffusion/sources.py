"""Where training images come from: Fashion-MNIST, MNIST, CIFAR-10 or a folder of images.

A `Source` knows its images' labels, class names and channels, reads image i as uint8
(C, S, S) at the model's size S, and describes itself for the checkpoint (dataset, path,
number of images, fingerprint), so a run never resumes on other data. The loaders in data.py
turn a source into batches; this module does no randomness. Each data.dataset is opened by its
builder here (fashion_mnist, mnist, cifar10, image_folder), registered in registry.DATASETS.

Image folders: one subfolder per class (labels from the sorted folder names), or images
directly in the folder for an unconditional model. Every image is decoded once before training
(in worker processes; the result is cached by the folder's fingerprint), so a broken file
stops the run with one line naming it before any work.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

from ddp_diffusion import files
from ddp_diffusion.config import DataConfig
from ddp_diffusion.errors import UserError, WriteFailed
from ddp_diffusion.registry import DATASETS
from ddp_diffusion.signals import loader_worker_init

log = logging.getLogger("ddp_diffusion")

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CLASS_NAMES = tuple(FashionMNIST.classes)  # T-shirt/top, Trouser, ..., Ankle boot
SHORT_NAMES = ("t-shirt", "pants", "sweater", "dress", "coat", "sandal", "shirt", "sneaker",
               "purse", "boot")  # the code-along's names
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
GREY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
UNCONDITIONAL = ("all",)  # the one class of an unconditional model


# ----------------------------------------------------------------------------- Fashion-MNIST


def raw_dir(root: str | Path) -> Path:
    """Where torchvision's FashionMNIST(download=False) expects the uncompressed IDX files."""
    return Path(root) / "FashionMNIST" / "raw"


def prepare(root: str | Path, debian_dir: str | Path, download: bool) -> None:
    """Make sure the four uncompressed IDX files exist under ROOT/FashionMNIST/raw/."""
    target = raw_dir(root)
    if all((target / name).is_file() for name in RAW_FILES):
        return
    debian = Path(debian_dir)
    if all((debian / f"{name}.gz").is_file() for name in RAW_FILES):
        for name in RAW_FILES:  # atomic: a crash never leaves a half-written IDX file
            with gzip.open(debian / f"{name}.gz", "rb") as src:
                try:
                    files.write_atomic(target / name, lambda dst, src=src: shutil.copyfileobj(
                        src, dst))
                except WriteFailed as e:
                    raise UserError(f"{e}: Fashion-MNIST is uncompressed into data.root once; "
                                    "set data.root to a folder you can write") from None
        return
    if download:
        _download(lambda: FashionMNIST(str(root), train=True, download=True), "Fashion-MNIST",
                  target)
        return
    raise UserError(
        f"Fashion-MNIST not found in {target} or {debian}: install it with "
        "'sudo apt-get install dataset-fashion-mnist', or set data.download=true to fetch it"
    )


def load_split(root: str | Path, train: bool, debian_dir: str | Path = "", download: bool = False
               ) -> tuple[Tensor, Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split, through torchvision's loader."""
    prepare(root, debian_dir, download)
    ds = FashionMNIST(str(root), train=train, download=False)
    return ds.data, ds.targets


def _download(fetch: Callable[[], object], name: str, where: Path) -> object:
    """Run a torchvision download; a failure (offline, say) is one line saying what to do."""
    try:
        return fetch()
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        raise UserError(f"could not download {name} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): put its files in {where} "
                        "yourself, or try again where there is internet") from None


# ----------------------------------------------------------------------------- pixels


def fit(images: Tensor, size: int) -> Tensor:
    """uint8 (..., C, H, W) -> uint8 (..., C, size, size): centred zero padding for a square image
    up to `size` (28 -> 32 keeps Fashion-MNIST's pixels), else an antialiased resize."""
    h, w = images.shape[-2:]
    if h == w == size:
        return images
    pad = size - h
    if h == w and pad > 0 and pad % 2 == 0:
        return F.pad(images, (pad // 2,) * 4)
    flat = images.reshape(-1, *images.shape[-3:]).float()
    out = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).reshape(*images.shape[:-2], size, size)


# What Pillow raises for a file it cannot read: broken bytes, or a decompression bomb (more
# pixels than Image.MAX_IMAGE_PIXELS allows; a DecompressionBombError is no OSError).
UNREADABLE = (OSError, SyntaxError, Image.DecompressionBombError)
WIDE_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit PNGs and TIFFs open as these


def unreadable(path: Path, e: BaseException) -> UserError:
    """The one line for an image file Pillow cannot (or will not) read."""
    if isinstance(e, Image.DecompressionBombError):
        return UserError(f"{path}: too many pixels to open safely ({e}); shrink or remove the "
                         "file")
    return UserError(f"{path}: unreadable image ({e}); replace or remove the file")


def to_8bit(im: Image.Image, path: Path) -> Image.Image:
    """16-bit and floating-point greyscale images as 8-bit "L", scaled over their full range:
    Pillow's convert clips them (a 16-bit gradient came out 99.6% white, a float one black).
    Integers are 16-bit (0..65535 -> 0..255); floats must lie in [0, 1] (0..1 -> 0..255), and
    other values are refused with one line, since no scale for them is safe to guess."""
    if im.mode not in (*WIDE_INT_MODES, "F"):
        return im
    a = np.asarray(im, dtype=np.float64)
    high = 1.0 if im.mode == "F" else 65535.0
    if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= high):
        raise UserError(f"{path}: a {im.mode} image with values {a.min():g}..{a.max():g}, "
                        f"outside 0..{high:g}; save it as 8- or 16-bit, or scale it to 0..{high:g}")
    return Image.fromarray(np.round(a * (255 / high)).astype(np.uint8), "L")


def decode(path: Path, channels: int, size: int) -> Tensor:
    """An image file as uint8 (channels, size, size): resized so its shorter side is `size`,
    then centre-cropped. Raises UserError naming the file if it cannot be read or converted."""
    mode = "?"
    try:
        with Image.open(path) as im:
            im.load()  # a truncated file fails here, not later
            mode = im.mode
            im = to_8bit(im, path).convert("RGB" if channels == 3 else "L")
    except ValueError as e:  # Pillow: no conversion for this mode
        raise UserError(f"{path}: cannot convert its mode {mode} to "
                        f"{'RGB' if channels == 3 else 'greyscale'} ({e}); convert or remove "
                        "the file") from None
    except UNREADABLE as e:
        raise unreadable(path, e) from None
    w, h = im.size
    scale = size / min(w, h)
    w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((w2, h2), Image.Resampling.BICUBIC)
    left, top = (w2 - size) // 2, (h2 - size) // 2
    im = im.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(im).copy())
    return pixels.permute(2, 0, 1) if channels == 3 else pixels[None]


# ----------------------------------------------------------------------------- sources


class Source:
    """A training set: labels, class names, channels, and image i as uint8 at the model size."""

    content: str | None = None  # a hash of every file's bytes, where the set is files

    def __init__(self, dataset: str, labels: Tensor, class_names: tuple[str, ...],
                 channels: int, image_size: int, path: str, fingerprint: str) -> None:
        self.dataset = dataset
        self.labels = labels
        self.class_names = class_names
        self.channels = channels
        self.image_size = image_size
        self.path = path
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """The whole set's size at the model's resolution, as uint8."""
        return len(self) * self.channels * self.image_size**2

    def read(self, i: int) -> Tensor:
        """Image i: uint8 (C, S, S)."""
        raise NotImplementedError

    def batches(self, batch_size: int, num_workers: int) -> Iterator[Tensor]:
        """Every image in order, `batch_size` at a time: uint8 (b, C, S, S)."""
        raise NotImplementedError

    def read_all(self, num_workers: int) -> Tensor:
        """Every image: uint8 (N, C, S, S)."""
        return torch.cat(list(self.batches(4096, num_workers)))

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records of the data, to refuse resuming on other data."""
        return {"dataset": self.dataset, "path": self.path, "num_images": len(self),
                "fingerprint": self.fingerprint, "content": self.content,
                "class_names": list(self.class_names), "channels": self.channels}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint trained on other data (keys it does not record are not checked:
        checkpoints before this module recorded only the count and the fingerprint)."""
        now = self.state_dict()
        changed = [k for k in ("dataset", "num_images", "fingerprint", "content")
                   if k in state and state[k] != now[k]]
        if changed:
            raise UserError(
                f"the training data changed since this checkpoint ({state.get('dataset', '')} "
                f"{state.get('path', '')}, {state['num_images']} images then; {self.dataset} "
                f"{self.path}, {len(self)} images now; {', '.join(changed)} differ): resume with "
                "the data it was trained on, or start a new run (train.resume=never or a new "
                "out_dir)")


class ArraySource(Source):
    """A set held as one uint8 array (torchvision's Fashion-MNIST, MNIST, CIFAR-10)."""

    def __init__(self, dataset: str, images: Tensor, labels: Tensor,
                 class_names: tuple[str, ...], image_size: int, path: str) -> None:
        h = hashlib.blake2b(digest_size=16)
        # Fashion-MNIST and MNIST are (N, H, W): hashed as they come, as before this module.
        for t in (images, labels):
            h.update(t.contiguous().numpy().tobytes())
        images = images[:, None] if images.dim() == 3 else images
        super().__init__(dataset, labels, class_names, images.shape[1], image_size, path,
                         h.hexdigest())
        self.images = images

    def read(self, i: int) -> Tensor:
        return fit(self.images[i], self.image_size)

    def batches(self, batch_size: int, num_workers: int) -> Iterator[Tensor]:
        """In memory already: no workers needed."""
        for i in range(0, len(self), batch_size):
            yield fit(self.images[i:i + batch_size], self.image_size)


class FolderSource(Source):
    """A folder of image files, decoded on demand."""

    def __init__(self, files: list[Path], labels: list[int], class_names: tuple[str, ...],
                 channels: int, image_size: int, path: Path, fingerprint: str,
                 content: str) -> None:
        super().__init__("image_folder", torch.tensor(labels, dtype=torch.long), class_names,
                         channels, image_size, str(path), fingerprint)
        self.files = files
        self.content = content
        # Pillow imports its format plugins lazily, on the first file it cannot identify. Done
        # in a loader worker, that import can fail inside importlib (a KeyError from its module
        # locks, seen on Python 3.11) instead of giving our one line; so import them all here,
        # before any worker is forked.
        Image.init()

    def read(self, i: int) -> Tensor:
        return decode(self.files[i], self.channels, self.image_size)

    def batches(self, batch_size: int, num_workers: int) -> Iterator[Tensor]:
        """Decoded in DataLoader workers."""
        return read_batches(self, batch_size, num_workers)


def collate(items: list[Tensor | str]) -> Tensor | str:
    """Stack images read by workers, or pass on the first one-line error among them."""
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.stack(items)


def read_batches(source: Source, batch_size: int, num_workers: int, keep: bool = True
                 ) -> Iterator[Tensor]:
    """Every image of a source in order, in batches read by DataLoader workers; a bad file
    raises its one line (keep=False: decode only, to check every file)."""
    loader = DataLoader(Reader(source, keep), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate, worker_init_fn=loader_worker_init)
    for batch in loader:
        if isinstance(batch, str):
            raise UserError(batch)
        yield batch


class Reader(Dataset):
    """Image i of a source, or its one-line error (raised by the main process, so the user sees
    the line, not a worker's traceback)."""

    def __init__(self, source: Source, keep: bool = True) -> None:
        self.source, self.keep = source, keep

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Tensor | str:
        try:
            pixels = self.source.read(i)
        except UserError as e:
            return str(e)
        return pixels if self.keep else torch.empty(0)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def scan_folder(path: Path, class_conditional: bool) -> tuple[list[Path], list[int],
                                                              tuple[str, ...]]:
    """Image files, labels and class names of a folder (one subfolder per class, or none)."""
    if not path.is_dir():
        raise UserError(f"data.path {path} is not a folder of images")
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    top = sorted(p for p in path.iterdir() if _is_image(p))
    if not classes:
        if not top:
            raise UserError(f"{path} has no images ({', '.join(IMAGE_SUFFIXES)}): put them "
                            "there, or one subfolder of them per class")
        return top, [0] * len(top), UNCONDITIONAL
    if top:
        raise UserError(f"{path} holds class folders and also images ({top[0].name}, ...): move "
                        "the images into a class folder")
    files, labels = [], []
    for label, folder in enumerate(classes):
        found = _images_under(folder)
        if not found:
            raise UserError(f"class folder {folder} has no images "
                            f"({', '.join(IMAGE_SUFFIXES)}): add some or remove the folder")
        files += found
        labels += [label] * len(found)
    if not class_conditional:
        return files, [0] * len(files), UNCONDITIONAL
    return files, labels, tuple(d.name for d in classes)


def _channels_of(files: list[Path]) -> int:
    """3 if any image is in colour, else 1 (the header is read, not the pixels)."""
    for f in files:
        try:
            with Image.open(f) as im:
                if im.mode not in GREY_MODES:
                    return 3
        except UNREADABLE as e:
            raise unreadable(f, e) from None
    return 1


def _write_cache(path: Path, text: str) -> None:
    """Write a cache file in data.root; if that cannot be written, go on without it."""
    try:
        files.write_text_atomic(path, text)
    except WriteFailed as e:
        log.warning("%s; going on without this cache (the next start does the work again)", e)


def content_digests(path: Path, images: list[Path], cache_dir: Path) -> list[str]:
    """The SHA-256 of each file's bytes. Each file is read once: the digests are cached in
    cache_dir by the file's (inode, size, mtime), so later starts only stat the files."""
    folder_key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    cache = cache_dir / f"digests-{folder_key}.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    fresh: dict[str, list[Any]] = {}
    for f in images:
        st = f.stat()
        stamp = [st.st_ino, st.st_size, st.st_mtime_ns]
        entry = known.get(str(f.relative_to(path)))
        if isinstance(entry, list) and entry[:3] == stamp:
            digest = entry[3]
        else:
            with f.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        fresh[str(f.relative_to(path))] = [*stamp, digest]
    if fresh != known:
        _write_cache(cache, json.dumps(fresh))
    return [entry[3] for entry in fresh.values()]


def open_folder(dc: DataConfig, image_size: int, num_workers: int) -> FolderSource:
    """Scan, fingerprint and check every image of data.path (once per folder state: cached).

    Two checks guard a resume against other data: the fingerprint (names and sizes, as runs
    before content hashes recorded) and the content hash (every file's bytes, SHA-256). An image
    edited in place is seen even at the same size. Not seen: an edit that keeps a file's inode,
    size and modification time (which editors and copies do not; only a deliberate reset of the
    mtime does), because digests are cached by those three to spare rereading the folder."""
    path = Path(dc.path or "")
    images, labels, names = scan_folder(path, dc.class_conditional)
    h = hashlib.sha256()
    for f in images:
        h.update(f"{f.relative_to(path)}\t{f.stat().st_size}\n".encode())
    fingerprint = h.hexdigest()[:32]
    checked = Path(dc.root) / "checked"
    digests = content_digests(path, images, checked)
    content = hashlib.sha256("".join(f"{f.relative_to(path)}\t{d}\n" for f, d in zip(
        images, digests, strict=True)).encode()).hexdigest()[:32]
    cache = checked / f"{content}-{image_size}-{dc.channels}.json"
    if cache.is_file():
        channels = json.loads(cache.read_text())["channels"]
    else:
        channels = dc.channels or _channels_of(images)
        source = FolderSource(images, labels, names, channels, image_size, path, fingerprint,
                              content)
        log.info("checking the %d images of %s (once; cached in %s)", len(images), path, cache)
        for _ in read_batches(source, 256, num_workers, keep=False):
            pass
        _write_cache(cache, json.dumps({"path": str(path), "num_images": len(images),
                                        "channels": channels}))
    return FolderSource(images, labels, names, channels, image_size, path, fingerprint, content)


def _array_source(dc: DataConfig, images: Tensor, labels: Tensor, names: tuple[str, ...],
                  image_size: int, train: bool) -> ArraySource:
    """A split held in memory as the configured source (one class if not class-conditional)."""
    if not dc.class_conditional:
        labels, names = torch.zeros_like(labels), UNCONDITIONAL
    root = Path(dc.root)
    source = ArraySource(dc.dataset, images, labels, names, image_size,
                         str(root) if train else f"{root} (test)")
    if dc.channels and dc.channels != source.channels:
        raise UserError(f"data.channels={dc.channels} but {dc.dataset} has {source.channels} "
                        "channel(s): remove data.channels")
    return source


def _torchvision(dc: DataConfig, cls: type, folder: str, files: str, image_size: int,
                 train: bool) -> ArraySource:
    """A torchvision dataset from data.root/folder (or downloaded); `files` says what to put
    there by hand."""
    root = Path(dc.root)
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        if not dc.download:
            raise UserError(f"{dc.dataset} not found in {root / folder}: put {files} there, or "
                            "set data.download=true to fetch it") from None
        ds = _download(lambda: cls(str(root), train=train, download=True), dc.dataset,
                       root / folder)
    data = ds.data if isinstance(ds.data, Tensor) else torch.from_numpy(ds.data)
    images = data.permute(0, 3, 1, 2).contiguous() if data.dim() == 4 else data
    return _array_source(dc, images, torch.as_tensor(ds.targets, dtype=torch.long),
                         tuple(ds.classes), image_size, train)


# registry.DATASETS' builders: builder(data config, image size, decoding workers, train split)


def fashion_mnist(dc: DataConfig, image_size: int, num_workers: int, train: bool
                  ) -> ArraySource:
    """Fashion-MNIST from data.root, prepared from Debian's package or downloaded if need be."""
    images, labels = load_split(dc.root, train, dc.debian_dir, dc.download)
    return _array_source(dc, images, labels, CLASS_NAMES, image_size, train)


def mnist(dc: DataConfig, image_size: int, num_workers: int, train: bool) -> ArraySource:
    """MNIST through torchvision."""
    return _torchvision(dc, MNIST, "MNIST/raw", "train-images-idx3-ubyte(.gz) and the other "
                                                "three IDX files", image_size, train)


def cifar10(dc: DataConfig, image_size: int, num_workers: int, train: bool) -> ArraySource:
    """CIFAR-10 through torchvision."""
    return _torchvision(dc, CIFAR10, "cifar-10-batches-py", "the CIFAR-10 python batches",
                        image_size, train)


def image_folder(dc: DataConfig, image_size: int, num_workers: int, train: bool
                 ) -> FolderSource:
    """data.path's images (open_folder); there is no test split."""
    if not train:
        raise UserError("an image folder has no test split: use --reference train")
    return open_folder(dc, image_size, num_workers)


def open_source(dc: DataConfig, image_size: int, num_workers: int = 0,
                train: bool = True) -> Source:
    """The configured training set (train=False: the test split of a torchvision dataset)."""
    return DATASETS[dc.dataset].build(dc, image_size, num_workers, train)
