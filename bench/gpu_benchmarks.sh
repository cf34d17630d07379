#!/usr/bin/env bash
# The GPU numbers of docs/performance.md and docs/evaluation.md in one go, most important first,
# each part time-boxed (TOTAL seconds in all) so that one lease of a GPU machine brings back
# everything that finished. The caps add up to 550 s: TOTAL (570) less ~20 s for the import
# check and nvidia-smi. The last two parts rewrite their results after every run or point, so
# one cut short by its cap still leaves what it measured.
#   bench/gpu_benchmarks.sh OUT_DIR DATA_ROOT RUNS   (RUNS: from `fid_at_budget.py train/pack`)
set -uo pipefail
out=$(realpath -m "$1") data=$2 runs=$(realpath -m "$3")
py=${PYTHON:-python3}
total=${TOTAL:-570}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out/compile"
left() {  # seconds for the next part: its cap, or what is left (at least 1: 0 means no limit)
  local l=$((total - SECONDS)); l=$(( l < $1 ? l : $1 )); echo $(( l > 0 ? l : 1 ))
}
# Fail fast: everything the benchmarks import.
$py -c "import ddp_diffusion.train, ddp_diffusion.fid, torchmultimodal; print('imports ok')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== FID at a fixed CPU training budget (10k samples, DDIM 50) [$SECONDS s]"
timeout "$(left 90)" $py bench/fid_at_budget.py eval --runs "$runs" --data-root "$data" \
  --out "$out" --batch-size 1000
echo "== training throughput, A/B [$SECONDS s]"
timeout "$(left 170)" $py bench/train_throughput.py --data-root "$data" --out "$out" --rounds 2 \
  --warmup 5 --steps 15 \
  --variants "codealong,ours fp32 (tf32),ours bf16,ours bf16 channels_last,recommended UNet bf16"
echo "== torch.compile [$SECONDS s]"
timeout "$(left 100)" $py bench/train_throughput.py --data-root "$data" --out "$out/compile" \
  --rounds 1 --warmup 10 --steps 15 \
  --variants "ours bf16 channels_last,ours bf16 channels_last compile"
# About 25 s a run (start-up + 200 steps): round 1 of the three values fits the cap.
echo "== host sync cadence: images/s vs train.sync_every, recommended UNet [$SECONDS s]"
timeout "$(left 90)" $py bench/sync_every.py --data-root "$data" --out "$out" --rounds 2 \
  --values 1,10,50 --steps 200 --log-every 50 --set train.compile=false
echo "== FID vs sampler steps and guidance [$SECONDS s]"
timeout "$(left 100)" $py bench/fid_vs_steps.py --run "$runs/ours" --data-root "$data" \
  --out-dir "$out" --num-samples 2000 --batch-size 1000 \
  --note "Model: the 'ours' run of bench/fid_at_budget.py (configs/quickstart_cpu.yaml, 15 min on 2 CPU cores). 2000 samples per point: FID is biased upwards at this sample count; compare the points with each other, not with published numbers."
echo "== done [$SECONDS s]"
