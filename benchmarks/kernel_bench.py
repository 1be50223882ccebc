"""Kernel timings (GPU): Triton 4-bit dequant and decode matmuls vs bitsandbytes and bf16, one run, one card.

    python benchmarks/kernel_bench.py [--sweep] [--gemv-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from slimtune.bench.kernels import run_kernel_bench

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", action="store_true", help="also time a grid of GEMV tile configs")
    p.add_argument("--gemv-only", action="store_true", help="skip the dequantization rows")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    rows = run_kernel_bench(sweep=args.sweep, dequant=not args.gemv_only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
