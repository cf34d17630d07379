"""Train the Fashion-MNIST classifier behind FID's `fashion` features (fixed seed and recipe).

Writes ddp_diffusion/assets/fashion_classifier.pt (state dict) and fashion_classifier.json
(SHA-256, measured test accuracy, recipe). Usage:
    python scripts/train_fashion_classifier.py [--data-root data] [--debian-dir DIR]
"""

from __future__ import annotations

import argparse
import json

from ddp_diffusion.classifier import WEIGHTS, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--debian-dir", default="/usr/share/datasets/fashion-mnist")
    args = parser.parse_args()
    info = train_classifier(args.data_root, args.debian_dir, WEIGHTS)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
