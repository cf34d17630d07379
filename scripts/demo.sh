#!/usr/bin/env bash
# The main job: train on real Fashion-MNIST, then sample every class into a labelled PNG grid.
# On a machine with CUDA it trains the GPU recipe on all GPUs; otherwise the CPU quickstart.
# Arguments are config overrides for the training run, e.g. a fast check (CI does this):
#   scripts/demo.sh train.max_steps=10 sample.steps=5
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-offline}

data=()
if [[ ! -d /usr/share/datasets/fashion-mnist && ! -d data/FashionMNIST/raw ]]; then
  echo "demo: Debian's dataset-fashion-mnist is not installed: downloading Fashion-MNIST" \
       "(data.download=true)"
  data=(data.download=true)
fi
gpus=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
if [[ $gpus -gt 0 ]]; then
  config=configs/fashion_mnist.yaml run=runs/fashion_mnist
  launch/torchrun.sh train --config "$config" "out_dir=$run" "${data[@]}" "$@"
else
  config=configs/quickstart_cpu.yaml run=runs/quickstart_cpu
  .venv/bin/ddp-diffusion train --config "$config" "out_dir=$run" "${data[@]}" "$@"
fi
# The sampler, its steps and the guidance are the run's sample.* settings.
.venv/bin/ddp-diffusion sample --run "$run" --classes all --per-class 8 --seed 0 \
  --out "$run/samples_all_classes.png"
echo "demo: sample grid for all 10 classes: $run/samples_all_classes.png"
