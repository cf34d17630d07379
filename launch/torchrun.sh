#!/usr/bin/env bash
# Workstation launcher: one process per GPU (or NPROC=N on CPU), arguments passed through.
#   launch/torchrun.sh train --config configs/fashion_mnist.yaml train.max_steps=1000
# Extra torchrun flags go in TORCHRUN_ARGS, e.g. TORCHRUN_ARGS="--max-restarts 3".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
nproc=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
# shellcheck disable=SC2086
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  ${TORCHRUN_ARGS:-} -m ddp_diffusion "$@"
