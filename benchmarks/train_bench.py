"""Training benchmark: slimtune vs peft (+ bitsandbytes) on random Llama shapes, one process, one card.

    python benchmarks/train_bench.py                                  # the six reference workloads
    python benchmarks/train_bench.py --workloads 8b-qlora-b1 --steps 5 --json out.json
    python benchmarks/train_bench.py --workloads 1b-lora-b4 --fused-layers both

slimtune's side runs the fast path as users get it, including the fused RMSNorm/RoPE/SwiGLU modules
(kernels/llama_fused.py, swapped in by get_peft_model). --fused-layers off runs slimtune without just
those (SLIMTUNE_FUSED_LAYERS=off; fused LoRA, Triton dequantization and chunked loss stay on); both
adds a slimtune row without them ("st-nofuse") beside each workload, measured in the same process,
and prints what they add. To measure one of the three, set it in the environment:
SLIMTUNE_FUSED_LAYERS=rmsnorm,rope python benchmarks/train_bench.py --fused-layers both. On a machine without CUDA the rows run on CPU (tiny workloads only; with
SLIMTUNE_FAST_PATH=on TRITON_INTERPRET=1 the Triton kernels run under the interpreter: a smoke test).
"""

from __future__ import annotations

import argparse
import os

from slimtune.bench import WORKLOADS, BenchReport, format_table, run_bench
from slimtune.kernels.llama_fused import ENV_FLAG

NOFUSE = "st-nofuse"


def _run(args: argparse.Namespace, fused: bool, baseline: bool) -> BenchReport:
    """run_bench with the fused layers on or off (the flag is read when get_peft_model builds each model)."""
    before = os.environ.get(ENV_FLAG)
    if not fused:
        os.environ[ENV_FLAG] = "off"
    try:
        return run_bench(args.workloads, seq_len=args.seq_len, warmup=args.warmup, steps=args.steps,
                         baseline=baseline, skip_baseline=tuple(args.skip_baseline),
                         max_step_seconds=args.max_step_seconds)
    finally:
        if before is None:
            os.environ.pop(ENV_FLAG, None)
        else:
            os.environ[ENV_FLAG] = before


def _merge(report: BenchReport, nofuse: BenchReport) -> None:
    """Put each workload's st-nofuse row after its slimtune and baseline rows."""
    rows = list(report.rows)
    for extra in nofuse.rows:
        extra.library = NOFUSE
        last = max(i for i, r in enumerate(rows) if r.workload == extra.workload)
        rows.insert(last + 1, extra)
    report.rows = rows
    report.settings["fused_layers"] = "both"


def _fused_gain(report: BenchReport) -> list[str]:
    """One line per workload: slimtune with / without the fused layers (tokens/s and peak memory)."""
    lines = []
    for name in dict.fromkeys(r.workload for r in report.rows):
        on = next((r for r in report.rows if r.workload == name and r.library == "slimtune"), None)
        off = next((r for r in report.rows if r.workload == name and r.library == NOFUSE), None)
        if on and off and on.status == off.status == "ok":
            lines.append(f"fused layers {name:<14} speedup {on.tokens_per_s / off.tokens_per_s:5.2f}x  "
                         f"peak {on.peak_gib:6.2f} vs {off.peak_gib:6.2f} GiB")
    return lines


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="*", choices=sorted(WORKLOADS))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--skip-baseline", nargs="*", default=[], help="workloads run for slimtune only")
    p.add_argument("--max-step-seconds", type=float, default=60.0)
    p.add_argument("--fused-layers", choices=("on", "off", "both"), default="on",
                   help="slimtune with the fused RMSNorm/RoPE/SwiGLU modules, without them, or both rows")
    p.add_argument("--json")
    args = p.parse_args()
    report = _run(args, fused=args.fused_layers != "off", baseline=True)
    if args.fused_layers == "both":
        _merge(report, _run(args, fused=False, baseline=False))
        print(format_table(report), *_fused_gain(report), sep="\n", flush=True)
    else:
        report.settings["fused_layers"] = args.fused_layers
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
