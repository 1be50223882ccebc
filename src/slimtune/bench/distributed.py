"""QLoRA throughput of data-parallel training on random-weight Llama shapes: 1 GPU vs N (DDP or FSDP2).

    torchrun --standalone --nproc_per_node 2 -m slimtune.bench.distributed --preset 8b --strategy ddp

Every rank trains its own `--batch` sequences of `--seq` random tokens per step (weak scaling: the
global batch grows with N), so tokens/s = batch x seq x N / step time; memory is each GPU's peak.
One JSON line per run is printed by rank 0 (and appended to --out). Models: bench/models.py; the
sharding and process group: train/distributed.py, as `slimtune train` uses them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from slimtune.bench.models import build_llama, slimtune_quantizer
from slimtune.bench.training import slimtune_loss, wrap_slimtune
from slimtune.train.distributed import fully_shard_model, setup, teardown, world_size


class LossModel(nn.Module):
    """Wraps a PEFT-wrapped causal LM: forward(ids) -> mean next-token loss (bench.training.slimtune_loss)."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return slimtune_loss(self.peft_model, ids)


def build(preset: str, device: torch.device, checkpointing: bool, seq: int) -> LossModel:
    model = build_llama(preset, device, torch.bfloat16, slimtune_quantizer, max_positions=max(seq, 64))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return LossModel(wrap_slimtune(model))


def run(args: argparse.Namespace) -> dict[str, object]:
    world = world_size()
    device = setup(args.device) if world > 1 else torch.device(args.device or "cuda")
    rank = dist.get_rank() if world > 1 else 0
    t0 = time.perf_counter()
    model = build(args.preset, device, args.checkpointing, args.seq)
    wrapped: nn.Module = model
    if world > 1 and args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids_ = [device.index] if device.type == "cuda" else None
        wrapped = DDP(model, device_ids=ids_, broadcast_buffers=False,
                      find_unused_parameters=False)
    elif world > 1:
        fully_shard_model(model.peft_model, root=model)
    build_s = time.perf_counter() - t0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.peft_model.get_base_model().config.vocab_size
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)

    def step() -> float:
        loss = wrapped(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    peaks = [peak]
    if world > 1:
        peaks = [0.0] * world
        dist.all_gather_object(peaks, peak)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"preset": args.preset, "strategy": args.strategy if world > 1 else "single", "gpus": world,
            "device": name, "batch_per_gpu": args.batch, "seq": args.seq, "steps": args.steps,
            "step_s": round(step_s, 4), "tokens_per_s": round(args.batch * args.seq * world / step_s, 1),
            "peak_gib_per_gpu": [round(p, 2) for p in peaks], "build_s": round(build_s, 1), "loss": round(loss, 4)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="8b")
    p.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    row = run(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(row), flush=True)
        if args.out:
            with Path(args.out).open("a") as f:
                f.write(json.dumps(row) + "\n")
    teardown()


if __name__ == "__main__":
    main()
