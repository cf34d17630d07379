"""The Fashion-MNIST classifier behind FID's `fashion` features: network, training, shipped weights.

The weights ship in ``ddp_diffusion/assets/`` with a JSON card (SHA-256, measured test accuracy,
recipe); ``scripts/train_fashion_classifier.py`` reproduces them with a fixed seed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddp_diffusion.errors import UserError
from ddp_diffusion.seeds import derive_seed
from ddp_diffusion.sources import load_split

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS = ASSETS / "fashion_classifier.pt"
CARD = ASSETS / "fashion_classifier.json"
IMAGE_SIZE = 32  # the denoisers' resolution: 28x28 images zero-padded, as sources.fit does
RECIPE: dict[str, Any] = {
    "epochs": 15, "batch_size": 128, "lr": 3e-3, "weight_decay": 5e-4, "schedule": "onecycle",
    "optimizer": "adamw", "label_smoothing": 0.1, "augment": "horizontal flip, shift <= 2 px",
    "seed": 0,
}


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class FashionClassifier(nn.Module):
    """A small CNN on uint8 (N, 1, 32, 32) images (3 conv+BN layers); 128-d penultimate features."""

    num_features = 128

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_block(1, 32), nn.MaxPool2d(2),  # 16x16
            *_block(32, 64), nn.MaxPool2d(2),  # 8x8
            *_block(64, 128), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(128 * 4 * 4, self.num_features, bias=False),
            nn.BatchNorm1d(self.num_features), nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer features of uint8 images (or floats in [-1, 1])."""
        x = images.float().div(127.5).sub(1.0) if images.dtype == torch.uint8 else images.float()
        return self.body(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(images)))


def to_uint8(images: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """uint8 (N, 28, 28) real images or floats in [-1, 1] -> uint8 (N, 1, size, size)."""
    if images.dtype == torch.uint8:
        x = images.unsqueeze(1) if images.dim() == 3 else images
        pad = size - x.shape[-1]
        return F.pad(x, (pad // 2, pad - pad // 2) * 2) if pad else x
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card() -> dict[str, Any]:
    """The shipped weights' card: sha256, test_accuracy, recipe, training time."""
    if not CARD.is_file():
        raise UserError(f"classifier card {CARD} is missing; "
                        "run scripts/train_fashion_classifier.py")
    return json.loads(CARD.read_text())


def load_classifier(path: Path = WEIGHTS, expected_sha256: str | None = None) -> FashionClassifier:
    """The shipped classifier in eval mode, its file checked against the card's SHA-256."""
    if not path.is_file():
        raise UserError(f"classifier weights {path} are missing; "
                        "run scripts/train_fashion_classifier.py")
    expected = expected_sha256 or card()["sha256"]
    actual = sha256_file(path)
    if actual != expected:
        raise UserError(f"classifier weights {path} have SHA-256 {actual}, expected {expected}: "
                        "the file is corrupt or not the shipped one")
    model = FashionClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels, per image."""
    n, size = len(x), x.shape[-1]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    di, dj = torch.randint(0, 5, (2, n), generator=gen)
    ar = torch.arange(size)
    rows = (di[:, None] + ar)[:, :, None]
    cols = (dj[:, None] + ar)[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy on uint8 (N, 28, 28) or (N, 1, 32, 32) images."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(to_uint8(images[i:i + batch_size]))
        correct += int((logits.argmax(1) == labels[i:i + batch_size]).sum())
    return correct / len(images)


def train_classifier(data_root: str | Path, debian_dir: str | Path, out: Path = WEIGHTS,
                     recipe: dict[str, Any] = RECIPE) -> dict[str, Any]:
    """Train with the fixed recipe, write the state dict and its card; returns the card."""
    r = recipe
    torch.manual_seed(r["seed"])
    gen = torch.Generator().manual_seed(derive_seed(r["seed"], "classifier"))
    images, labels = load_split(data_root, train=True, debian_dir=debian_dir)
    test_images, test_labels = load_split(data_root, train=False, debian_dir=debian_dir)
    x_all = to_uint8(images).float().div(127.5).sub(1.0)
    model = FashionClassifier().to(memory_format=torch.channels_last)  # 2x faster on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    steps_per_epoch = len(images) // r["batch_size"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, r["lr"], total_steps=r["epochs"] *
                                                steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(r["epochs"]):
        model.train()
        perm = torch.randperm(len(images), generator=gen)
        for k in range(steps_per_epoch):
            idx = perm[k * r["batch_size"]:(k + 1) * r["batch_size"]]
            x = _augment(x_all[idx], gen).contiguous(memory_format=torch.channels_last)
            logits = model(x)
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=r["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, test_images, test_labels)
        print(f"epoch {epoch + 1}/{r['epochs']}: loss {loss.item():.4f}, test accuracy "
              f"{acc:.4f}, {time.perf_counter() - start:.0f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.to(memory_format=torch.contiguous_format).state_dict(), out)
    info = {"sha256": sha256_file(out), "test_accuracy": acc, "recipe": r,
            "train_seconds": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info
