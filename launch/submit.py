#!/usr/bin/env python3
"""Submit training to SLURM through submitit: the same as `ddp-diffusion submit ARGS`.

    launch/submit.py --nodes 4 --gpus-per-node 8 --partition gpu --time 2-00:00:00 \
        --config configs/fashion_mnist.yaml out_dir=runs/fm
"""

import sys

from ddp_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
