#!/usr/bin/env bash
# The main job: train on real Fashion-MNIST, then sample every class into a labelled PNG grid.
# On a machine with CUDA it trains the GPU recipe on all GPUs; otherwise the CPU quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-offline}

gpus=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
if [[ $gpus -gt 0 ]]; then
  config=configs/fashion_mnist.yaml run=runs/fashion_mnist
  launch/torchrun.sh train --config "$config" "out_dir=$run" "$@"
else
  config=configs/quickstart_cpu.yaml run=runs/quickstart_cpu
  .venv/bin/ddp-diffusion train --config "$config" "out_dir=$run" "$@"
fi
.venv/bin/ddp-diffusion sample --run "$run" --classes all --per-class 8 --sampler ddim \
  --steps 50 --seed 0 --out "$run/samples_all_classes.png"
echo "demo: sample grid for all 10 classes: $run/samples_all_classes.png"
