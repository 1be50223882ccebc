"""slimtune.bench: side-by-side training benchmarks (slimtune vs peft / peft+bitsandbytes) and kernel timings.

`run_bench(...)` is what `slimtune bench` calls; `kernels.run_kernel_bench()` times the Triton kernels
against bitsandbytes and bf16 (GPU only). Both print a short table and return the numbers.
"""

from slimtune.bench.run import WORKLOADS, BenchReport, format_table, run_bench

__all__ = ["WORKLOADS", "BenchReport", "format_table", "run_bench"]
