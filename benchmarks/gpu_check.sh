#!/usr/bin/env bash
# GPU check in one go (~14 minutes on an H200, estimated): the GPU tests, kernel timings vs
# bitsandbytes and bf16, then the training benchmark vs peft / peft+bitsandbytes; short tables last.
#   bash benchmarks/gpu_check.sh            # full: six reference workloads
#   bash benchmarks/gpu_check.sh sweep      # full, plus a sweep of the decode-matmul tile configs
#   bash benchmarks/gpu_check.sh quick      # tests + kernels + two small training rows
# Logs and JSON go to $OUT (default /tmp/gpu_check). The baselines need peft and bitsandbytes (the
# device machine gets bitsandbytes from the wheel in .whl, see docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia_smi.csv"
start=$(date +%s)
stamp() { echo "[gpu_check] $1 done at +$(( $(date +%s) - start ))s"; }

python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu tests > "$OUT/gpu_tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -12
stamp tests

SWEEP=""; [ "$MODE" = sweep ] && SWEEP=--sweep
python3 benchmarks/kernel_bench.py $SWEEP --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
stamp kernels

if [ "$MODE" = quick ]; then
  python3 benchmarks/train_bench.py --workloads 1b-lora-b4 8b-qlora-b1 --warmup 1 --steps 2 \
    --json "$OUT/train.json" > "$OUT/train.log" 2>&1
else
  python3 benchmarks/train_bench.py --warmup 3 --steps 6 --max-step-seconds 20 --graph --graph-nockpt --kbit \
    --json "$OUT/train.json" > "$OUT/train.log" 2>&1
fi
stamp training
grep -v -E "^\[sweep\]|^gemv-sweep" "$OUT/kernels.log" | tail -45
grep -v "^\[bench\]" "$OUT/train.log" | tail -25
