"""Training benchmark: slimtune vs peft (+ bitsandbytes) on random Llama shapes, one process, one card.

    python benchmarks/train_bench.py                                  # the six reference workloads
    python benchmarks/train_bench.py --workloads 8b-qlora-b1 --steps 5 --json out.json
"""

from __future__ import annotations

import argparse

from slimtune.bench import WORKLOADS, run_bench

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="*", choices=sorted(WORKLOADS))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--skip-baseline", nargs="*", default=[], help="workloads run for slimtune only")
    p.add_argument("--max-step-seconds", type=float, default=60.0)
    p.add_argument("--json")
    args = p.parse_args()
    run_bench(args.workloads, seq_len=args.seq_len, warmup=args.warmup, steps=args.steps,
              skip_baseline=tuple(args.skip_baseline), max_step_seconds=args.max_step_seconds, json_path=args.json)
