#!/usr/bin/env bash
# The GPU numbers of docs/performance.md and docs/evaluation.md in one go, most important first,
# each part time-boxed so that one lease of a GPU machine brings back everything that finished.
#   bench/gpu_benchmarks.sh OUT_DIR DATA_ROOT RUNS   (RUNS: from `fid_at_budget.py train/pack`)
set -uo pipefail
out=$1 data=$2 runs=$3
py=${PYTHON:-python3}
mkdir -p "$out/compile"
cd "$(dirname "$0")/.."
# Fail fast: everything the benchmarks import.
$py -c "import ddp_diffusion.train, ddp_diffusion.fid, torchmultimodal; print('imports ok')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== FID at a fixed CPU training budget (10k samples, DDIM 50)"
timeout 150 $py bench/fid_at_budget.py eval --runs "$runs" --data-root "$data" --out "$out" \
  --batch-size 1000
echo "== training throughput, A/B"
timeout 200 $py bench/train_throughput.py --data-root "$data" --out "$out" --rounds 2 \
  --warmup 5 --steps 15 \
  --variants "codealong,ours fp32 (tf32),ours bf16,ours bf16 channels_last,recommended UNet bf16"
echo "== FID vs sampler steps and guidance"
timeout 170 $py bench/fid_vs_steps.py --run "$runs/ours" --data-root "$data" --out-dir "$out" \
  --num-samples 2000 --batch-size 1000 \
  --note "Model: the 'ours' run of bench/fid_at_budget.py (configs/quickstart_cpu.yaml, 20 min on 2 CPU cores). 2000 samples per point: FID is biased upwards at this sample count; compare points with each other, not with published numbers."
echo "== torch.compile"
timeout 120 $py bench/train_throughput.py --data-root "$data" --out "$out/compile" --rounds 1 \
  --warmup 10 --steps 15 --variants "codealong,ours bf16 channels_last compile"
echo "== done"
