#!/usr/bin/env bash
# Multi-GPU checks on one host with 2 GPUs (issue #8, docs/distributed.md), in one go:
#   1. tests/train/test_distributed.py under nccl (SLIMTUNE_DIST_TEST_DEVICE=cuda): 2 GPUs (DDP, FSDP2 QLoRA)
#      give the 1-GPU losses and adapter;
#   2. one 70B-shape QLoRA step with FSDP2 over the 2 GPUs (batch 1, seq 2048): s/step, tokens/s, peak per GPU;
#   3. 8B-shape QLoRA, FSDP2 vs DDP tokens/s, if the time budget leaves room.
# Each stage has its own time limit (one hang costs only its slot); the table at the end reads $OUT/bench.jsonl.
#   OUT=/tmp/multi bash benchmarks/gpu_multi.sh            (BUDGET_S: seconds for the whole script, default 285)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_multi}
BUDGET_S=${BUDGET_S:-285}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SLIMTUNE_DIST_TEST_DEVICE=cuda
BENCH=(python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m slimtune.bench.distributed)
left() { echo $((BUDGET_S - SECONDS)); }

python3 -c "import torch, transformers as t; print('torch', torch.__version__, '| transformers', t.__version__, '|',
torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0))"

echo "== 1. nccl parity: 2 GPUs vs 1 (DDP LoRA, FSDP2 QLoRA)"
timeout 105 python3 -m pytest -q -x -p no:cacheprovider tests/train/test_distributed.py \
  -k "test_two_ranks_give_the_one_rank_losses_and_adapter or test_fsdp2_qlora_two_ranks" 2>&1 | tail -n 25
echo "tests exit: $?  (elapsed ${SECONDS}s)"

echo "== 2. 70B-shape QLoRA, FSDP2 on 2 GPUs"
timeout $(( $(left) < 140 ? $(left) : 140 )) "${BENCH[@]}" --preset 70b --strategy fsdp2 --batch 1 --seq 2048 \
  --steps 2 --warmup 1 --checkpointing --out "$OUT/bench.jsonl" 2>&1 | grep -v "^W[0-9]" | tail -n 30
echo "70b exit: $?  (elapsed ${SECONDS}s)"

for strategy in fsdp2 ddp; do
  if [ "$(left)" -lt 40 ]; then echo "== 3. 8B $strategy: skipped, $(left)s left"; continue; fi
  echo "== 3. 8B-shape QLoRA, $strategy on 2 GPUs"
  timeout $(( $(left) < 60 ? $(left) : 60 )) "${BENCH[@]}" --preset 8b --strategy "$strategy" --batch 4 --seq 2048 \
    --steps 3 --warmup 1 --out "$OUT/bench.jsonl" 2>&1 | grep -v "^W[0-9]" | tail -n 20
  echo "8b $strategy exit: $?  (elapsed ${SECONDS}s)"
done

python3 - "$OUT/bench.jsonl" <<'EOF'
import json, pathlib, sys
path = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
print("| run | GPUs | s/step | tokens/s | peak GiB per GPU | build s | loss |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['preset']} QLoRA {r['strategy']} b{r['batch_per_gpu']} s{r['seq']} | {r['gpus']} | {r['step_s']} | "
          f"{r['tokens_per_s']:,} | {', '.join(map(str, r['peak_gib_per_gpu']))} | {r['build_s']} | {r['loss']} |")
print(f"({len(rows)} benchmark rows; device {rows[0]['device'] if rows else '-'})")
EOF
