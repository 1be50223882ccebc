"""Where one training step's time goes (#7 bottleneck notes): slimtune's bench step under torch.profiler.

    python benchmarks/profile_step.py --workload 8b-qlora-b1

Prints the step times with Python's garbage collector on and off (a host-side stall shows up as a
spread between steps), then, for two profiled steps, GPU busy time against wall time (the rest is the
GPU waiting for the host) and the top CUDA kernels by total time. --graph profiles the CUDA-graph step
(bench/graphed_step.py) instead: the kernels inside the replayed graph.
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

from slimtune.bench.graphed_step import graphed_step
from slimtune.bench.models import PRESETS, build_llama, slimtune_quantizer
from slimtune.bench.run import WORKLOADS
from slimtune.bench.training import slimtune_loss, time_steps, wrap_slimtune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="8b-qlora-b1", choices=sorted(WORKLOADS))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--graph", action="store_true", help="profile the CUDA-graph step (bench/graphed_step.py)")
    args = p.parse_args()
    work = WORKLOADS[args.workload]
    dev = torch.device("cuda")
    quantizer = slimtune_quantizer if work.quantized else None
    model = wrap_slimtune(build_llama(work.preset, dev, torch.bfloat16, quantizer, seed=0,
                                       max_positions=args.seq_len)).train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = torch.randint(0, PRESETS[work.preset]["vocab_size"], (work.batch, args.seq_len), device=dev)

    def step() -> None:
        slimtune_loss(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if args.graph:
        step, graphed = graphed_step(model, lambda: slimtune_loss(model, ids), opt)

    time_steps(step, 3, dev)
    on = time_steps(step, args.steps, dev)
    gc.disable()
    off = time_steps(step, args.steps, dev)
    gc.enable()
    for name, ts in (("gc on", on), ("gc off", off)):
        print(f"{args.workload} {name:<7} median {1e3 * statistics.median(ts):7.1f} ms  min {1e3 * min(ts):7.1f}  "
              f"max {1e3 * max(ts):7.1f}  steps {[round(1e3 * t) for t in ts]}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = sum(time_steps(step, 2, dev))
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"profiled 2 steps: wall {1e3 * wall:.1f} ms, GPU kernels {busy / 1e3:.1f} ms "
          f"({100 * busy / 1e3 / (1e3 * wall):.0f}% busy; profiler overhead included in wall)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))
    if args.graph:
        print(f"graph: {'replayed' if graphed.captured else f'eager ({graphed.reason})'}")


if __name__ == "__main__":
    main()
