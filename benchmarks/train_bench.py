"""Training benchmark: slimtune vs peft (+ bitsandbytes) on random Llama shapes, one process, one card.

    python benchmarks/train_bench.py                                  # the six reference workloads
    python benchmarks/train_bench.py --workloads 8b-qlora-b1 --steps 5 --json out.json
    python benchmarks/train_bench.py --workloads 1b-lora-b4 --fused-layers both

slimtune's side runs the fast path as `slimtune train` does, including the fused RMSNorm/RoPE/SwiGLU
forwards (kernels/llama_fused.py, switched on by enable_fast_path). --fused-layers off runs slimtune without
just those (SLIMTUNE_FUSED_LAYERS=off; fused LoRA, Triton dequantization and chunked loss stay on); both
adds a slimtune row without them ("st-nofuse") beside each workload, measured in the same process,
and prints what they add. To measure one of the three, set it in the environment:
SLIMTUNE_FUSED_LAYERS=rmsnorm,rope python benchmarks/train_bench.py --fused-layers both.
--kbit adds, for 4-bit workloads, the QLoRA tutorial recipe as a second baseline ("peft+bnb-kbit": peft's
prepare_model_for_kbit_training, which upcasts norms, embeddings and head to fp32).
--offload adds a slimtune row with the checkpointed layer inputs offloaded to pinned host memory
("st-offload", train.offload_checkpoints) to each workload, with its ratios to the baseline.
--graph-nockpt adds st-graph without gradient checkpointing ("st-graph-nockpt": no recompute, every
layer's activations kept; `slimtune train`'s default, train.gradient_checkpointing: false).
--repeats 2 measures every row twice, the order of the libraries reversed in the second round, and
keeps each side's fastest round (slimtune's rounds differed by up to 23% on one H200).
On a machine without CUDA the rows run on CPU (tiny workloads only; with SLIMTUNE_FAST_PATH=on
TRITON_INTERPRET=1 the Triton kernels run under the interpreter: a smoke test).
"""

from __future__ import annotations

import argparse
import os

from slimtune.bench import WORKLOADS, BenchReport, format_table, run_bench
from slimtune.bench.run import OFFLOAD
from slimtune.kernels.llama_fused import ENV_FLAG

NOFUSE = "st-nofuse"


def _run(args: argparse.Namespace, fused: bool, baseline: bool) -> BenchReport:
    """run_bench with the fused layers on or off (the flag is read when enable_fast_path runs on each model)."""
    before = os.environ.get(ENV_FLAG)
    if not fused:
        os.environ[ENV_FLAG] = "off"
    try:
        return run_bench(args.workloads, seq_len=args.seq_len, warmup=args.warmup, steps=args.steps,
                         baseline=baseline, skip_baseline=tuple(args.skip_baseline),
                         max_step_seconds=args.max_step_seconds, offload=baseline and args.offload,
                         repeats=args.repeats, kbit_baseline=baseline and args.kbit,
                         cuda_graph=baseline and args.graph,
                         graph_no_checkpoint=baseline and args.graph_nockpt)
    finally:
        if before is None:
            os.environ.pop(ENV_FLAG, None)
        else:
            os.environ[ENV_FLAG] = before


def _merge(report: BenchReport, extra: BenchReport, label: str) -> None:
    """Put each workload's variant row (label) after its slimtune and baseline rows."""
    rows = list(report.rows)
    for row in extra.rows:
        row.library = label
        last = max(i for i, r in enumerate(rows) if r.workload == row.workload)
        rows.insert(last + 1, row)
    report.rows = rows


def _row(report: BenchReport, workload: str, library: str):
    return next((r for r in report.rows if r.workload == workload and r.library == library and r.status == "ok"), None)


def _variant_lines(report: BenchReport) -> list[str]:
    """Per workload: what the fused layers add (vs st-nofuse), and what offload costs and saves."""
    lines = []
    for name in dict.fromkeys(r.workload for r in report.rows):
        on, off = _row(report, name, "slimtune"), _row(report, name, NOFUSE)
        if on and off:
            lines.append(f"fused layers {name:<14} speedup {on.tokens_per_s / off.tokens_per_s:5.2f}x  "
                         f"peak {on.peak_gib:6.2f} vs {off.peak_gib:6.2f} GiB")
        moved = _row(report, name, OFFLOAD)
        base = next((r for r in report.rows if r.workload == name and r.library.startswith("peft")
                     and r.status == "ok"), None)
        if on and moved:
            vs_base = (f"; vs baseline {moved.tokens_per_s / base.tokens_per_s:4.2f}x tokens/s, "
                       f"{moved.peak_gib / max(base.peak_gib, 1e-9):4.2f}x memory") if base else ""
            lines.append(f"offload      {name:<14} tokens/s {moved.tokens_per_s / on.tokens_per_s:5.2f}x  "
                         f"peak {moved.peak_gib:6.2f} vs {on.peak_gib:6.2f} GiB{vs_base}")
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
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds per workload, library order alternating; each side's fastest round is kept")
    p.add_argument("--offload", action="store_true", help="also a slimtune row with checkpoint offload")
    p.add_argument("--graph", action="store_true",
                   help="also a slimtune row with forward + backward replayed as a CUDA graph (st-graph)")
    p.add_argument("--graph-nockpt", action="store_true",
                   help="also a st-graph row without gradient checkpointing (st-graph-nockpt), as slimtune train "
                        "runs by default")
    p.add_argument("--kbit", action="store_true",
                   help="4-bit workloads: also a peft+bnb row with peft's prepare_model_for_kbit_training")
    p.add_argument("--json")
    args = p.parse_args()
    report = _run(args, fused=args.fused_layers != "off", baseline=True)
    report.settings["fused_layers"] = args.fused_layers
    if args.fused_layers == "both":
        _merge(report, _run(args, fused=False, baseline=False), NOFUSE)
    if args.fused_layers == "both" or args.offload:
        print(format_table(report), *_variant_lines(report), sep="\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
