"""What one slimtune training step holds at its memory peak (#7: where the 1B bf16 LoRA peak goes).

    python benchmarks/memory_probe.py --workload 1b-lora-b4 [--graph]

Builds the bench workload as benchmarks/train_bench.py does, runs two warmup steps, then records the
CUDA caching allocator's history (torch.cuda.memory._record_memory_history) over one step and replays
the trace: at the moment the step's allocations peak, the live blocks are grouped by size (or, with
--stacks python, by the innermost source line in slimtune, transformers or torch.utils.checkpoint). What was allocated
before the step (weights, adapter, optimizer state) is itemised from the model and optimizer.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from slimtune.bench.graphed_step import graphed_step
from slimtune.bench.models import PRESETS, build_llama, slimtune_quantizer
from slimtune.bench.run import WORKLOADS
from slimtune.bench.training import slimtune_loss, wrap_slimtune

MiB = 2**20
KEEP = ("slimtune", "transformers", "checkpoint.py")


def _site(frames: list[dict]) -> str:
    """The innermost frame in our code, transformers or checkpointing (else the innermost at all)."""
    for f in frames:
        if any(k in f["filename"] for k in KEEP):
            return f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"
    return f"{frames[0]['filename'].rsplit('/', 1)[-1]}:{frames[0]['line']}" if frames else ""


def peak_composition(trace: list[dict]) -> tuple[int, dict[str, int]]:
    """Replay alloc / free events: (peak bytes above the start, live bytes by site at that peak)."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[str, int] = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _site(e.get("frames", [])) or f"blocks of {e['size'] / MiB:.1f} MiB")
            total += e["size"]
            if total > peak:
                peak = total
                at_peak = defaultdict(int)
                for size, site in live.values():
                    at_peak[site] += size
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    return peak, dict(at_peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="1b-lora-b4", choices=sorted(WORKLOADS))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--stacks", choices=("python", "none"), default="none",
                   help="python: group by source line (crashed inside checkpoint recompute on torch 2.11); "
                        "none: group by block size")
    p.add_argument("--graph", action="store_true", help="record the step that captures the CUDA graph (st-graph)")
    args = p.parse_args()
    work, dev = WORKLOADS[args.workload], torch.device("cuda")
    quantizer = slimtune_quantizer if work.quantized else None
    model = wrap_slimtune(build_llama(work.preset, dev, torch.bfloat16, quantizer, seed=0,
                                       max_positions=args.seq_len)).train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, PRESETS[work.preset]["vocab_size"], (work.batch, args.seq_len), device=dev)

    def step() -> None:
        slimtune_loss(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if args.graph:  # two eager warmup calls; the recorded third call captures, then replays
        step, graphed = graphed_step(model, lambda: slimtune_loss(model, ids), opt)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    frozen = sum(q.numel() * q.element_size() for q in model.parameters() if not q.requires_grad)
    frozen += sum(b.numel() * b.element_size() for b in model.buffers())
    adapter = sum(q.numel() * q.element_size() for q in trainable)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    start = torch.cuda.memory_allocated()
    print(f"before the step: {start / MiB:8.1f} MiB allocated = frozen weights+buffers {frozen / MiB:.1f} + "
          f"adapter {adapter / MiB:.1f} ({trainable[0].dtype}) + AdamW state {state / MiB:.1f} + other "
          f"{(start - frozen - adapter - state) / MiB:.1f}")
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python",
                                             context="alloc" if args.stacks == "python" else None)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated()
    trace = [e for dev_trace in snap["device_traces"] for e in dev_trace]
    rise, sites = peak_composition(trace)
    print(f"step peak {peak / MiB:.1f} MiB ({peak / 2**30:.2f} GiB); the step's own allocations at their "
          f"peak: {rise / MiB:.1f} MiB ({len(trace)} events)")
    for site, size in sorted(sites.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {size / MiB:9.1f} MiB  {site}")
    if args.graph:
        print(f"graph: {'replayed' if graphed.captured else f'eager ({graphed.reason})'}; allocated after the "
              f"capture {torch.cuda.memory_allocated() / MiB:.1f} MiB")


if __name__ == "__main__":
    main()
