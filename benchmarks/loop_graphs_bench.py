"""`slimtune train`'s loop with train.cuda_graphs false and auto (the default; train/cuda_graphs.py), same data and seed.

    python benchmarks/loop_graphs_bench.py --assets .gpu_assets/smollm2-135m

The SmolLM2-135M architecture (its config.json, random weights from the seed), LoRA r=16 on all seven
projections, bf16, batch 8 of random rows 64-512 tokens long (a third of each row is prompt, no loss),
right-padded to the longest row by the SFT collator. Each run trains --steps optimizer steps; the
table gives the loop's own tokens/s (real tokens, metrics rows of 10 steps) after the first 20 steps
(warmup and the captures), and the losses of both runs side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch


def rows(n: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(64, 513, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = length // 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def run(args: argparse.Namespace, graphs: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.data.collate import SFTCollator
    from slimtune.train.config import TrainConfig
    from slimtune.train.loop import Trainer
    from slimtune.train.methods import build_peft_config, prepare_model
    from slimtune.train.rng import seed_everything

    seed_everything(args.seed)
    config = LlamaConfig.from_dict(json.loads((args.assets / "config.json").read_text()))
    base = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    peft = build_peft_config("lora", {"r": 16, "lora_alpha": 16, "target_modules": "all-linear"}, total_steps=args.steps)
    model = prepare_model(base, "lora", peft, gradient_checkpointing=args.checkpointing)
    cfg = TrainConfig(cuda_graphs="auto" if graphs else False, device="cuda", precision="bf16", batch_size=args.batch, max_steps=args.steps,
                      lr=1e-4, log_every=10, save_every=10**6, report_to=[], seed=args.seed,
                      gradient_checkpointing=args.checkpointing)
    data = rows(args.batch * args.steps, config.vocab_size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, cfg, data, None, SFTCollator(pad_token_id=0), Path(tmp), progress=False)
        state = trainer.fit()
    metrics = [r for r in state.history if "loss" in r]
    late = [r["tokens_per_s"] for r in metrics if r["step"] > 20]
    out = {"graphs": graphs, "tokens_per_s": statistics.median(late), "losses": [r["loss"] for r in metrics],
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    if trainer.graphs is not None:
        out.update(replays=trainer.graphs.replays, buckets=len(trainer.graphs.buckets),
                   captured=sum(b.graph is not None for b in trainer.graphs.buckets.values()),
                   reason=trainer.graphs.reason)
    del trainer, model, base
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", type=Path, default=Path(".gpu_assets/smollm2-135m"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    eager, graphs = run(args, False), run(args, True)
    print(f"{'':8} {'tokens/s':>10} {'peak GiB':>9}  losses every 10 steps")
    for r in (eager, graphs):
        print(f"{'graphs' if r['graphs'] else 'eager':8} {r['tokens_per_s']:10.0f} {r['peak_gib']:9.2f}  "
              + " ".join(f"{x:.4f}" for x in r["losses"]))
    print(f"speedup {graphs['tokens_per_s'] / eager['tokens_per_s']:.2f}x; graphs: {graphs.get('captured')} captured "
          f"of {graphs.get('buckets')} buckets, {graphs.get('replays')} replays, reason {graphs.get('reason')}")
    if args.json:
        args.json.write_text(json.dumps({"eager": eager, "graphs": graphs}, indent=1))


if __name__ == "__main__":
    main()
