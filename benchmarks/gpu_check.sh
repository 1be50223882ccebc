#!/usr/bin/env bash
# GPU check in one go (fits ~8 minutes on an H200): kernel parity tests on CUDA, kernel timings vs
# bitsandbytes and bf16, then the training benchmark vs peft / peft+bitsandbytes; short tables last.
#   bash benchmarks/gpu_check.sh            # full: six reference workloads
#   bash benchmarks/gpu_check.sh quick      # tests + kernel sweep + two small training rows
# Logs and JSON go to $OUT (default /tmp/gpu_check). Needs bitsandbytes for the baselines (the device
# machine gets it from the wheel in .whl, see docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia_smi.csv"
start=$(date +%s)

python3 -m pytest -q -p no:cacheprovider tests/kernels --deselect tests/kernels/test_bench_smoke.py \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -3
echo "[gpu_check] tests done at +$(( $(date +%s) - start ))s"

if [ "$MODE" = quick ]; then
  python3 benchmarks/kernel_bench.py --sweep --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
  echo "[gpu_check] kernels done at +$(( $(date +%s) - start ))s"
  python3 benchmarks/train_bench.py --workloads 1b-lora-b4 8b-qlora-b1 --warmup 1 --steps 2 \
    --json "$OUT/train.json" > "$OUT/train.log" 2>&1
else
  python3 benchmarks/kernel_bench.py --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
  echo "[gpu_check] kernels done at +$(( $(date +%s) - start ))s"
  python3 benchmarks/train_bench.py --warmup 2 --steps 3 --max-step-seconds 25 \
    --json "$OUT/train.json" > "$OUT/train.log" 2>&1
fi
echo "[gpu_check] training done at +$(( $(date +%s) - start ))s"
grep -v "^\[sweep\]" "$OUT/kernels.log" | grep -v "^gemv-sweep" | tail -40
grep -v "^\[bench\]" "$OUT/train.log" | tail -25
