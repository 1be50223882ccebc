"""`slimtune bench`: slimtune vs peft (+ bitsandbytes) on the reference workloads, side by side in one run.

Registered in main.py with `app.command("bench")(bench_command)`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from slimtune.cli.common import guarded


def bench_command(
    workloads: Annotated[list[str] | None, typer.Argument(
        help="Workload names (default: 1b-lora-b4 1b-qlora-b4 8b-lora-b1 8b-qlora-b1 8b-qlora-b4 70b-qlora-b1).",
        show_default=False)] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=1, help="Tokens per row.")] = 2048,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps per workload.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first.")] = 2,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline",
                                           help="Also run peft (+ bitsandbytes for 4-bit).")] = True,
    device: Annotated[str | None, typer.Option("--device", help="cuda (default when present) or cpu "
                                               "(a smoke run on a tiny shape; its numbers mean nothing).")] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    kbit: Annotated[bool, typer.Option("--kbit", help="4-bit workloads: also the QLoRA tutorial recipe as a "
                                       "baseline (peft's prepare_model_for_kbit_training).")] = False,
    graph: Annotated[bool, typer.Option("--graph", help="Also a slimtune row with forward + backward replayed "
                                        "as a CUDA graph (st-graph).")] = False,
    graph_nockpt: Annotated[bool, typer.Option("--graph-nockpt", help="Also st-graph without gradient "
                                               "checkpointing (slimtune train's default) and, with the baseline, "
                                               "the baseline without it (peft-nockpt).")] = False,
) -> None:
    """Measure tokens/s, peak memory and MFU of slimtune and the baseline, and print their ratios."""
    def body() -> None:
        from slimtune.bench import run_bench

        run_bench(workloads or None, device=device, seq_len=seq_len, warmup=warmup, steps=steps,
                  baseline=baseline, json_path=json_path, kbit_baseline=kbit,
                  cuda_graph=graph, graph_no_checkpoint=graph_nockpt)

    guarded(body)
