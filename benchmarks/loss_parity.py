"""Loss-curve parity (#7 item 4): slimtune's own loop with the fast path vs the reference path.

Each curve is `run_training` (what `slimtune train` runs) on the shipped WordNet rows, same seed and
data: the SmolLM2-135M architecture (its config.json; weights random from --seed, saved once so every
run loads the same ones) with the real SmolLM2 tokenizer. For LoRA (bf16 base) and QLoRA (NF4+DQ):
    fast  SLIMTUNE_FAST_PATH=auto, bf16 autocast: fused LoRA, Triton dequant, chunked LM-head CE
    ref   SLIMTUNE_FAST_PATH=off,  bf16 autocast: the plain layers and logits
    fp32  SLIMTUNE_FAST_PATH=off,  fp32: the yardstick; |ref - fp32| is what bf16 alone changes
The table gives max and mean |loss_fast - loss_ref| over the steps next to max and mean
|loss_ref - loss_fp32|, and the final losses. Fast and ref round differently in bf16, so their gap is
judged against the bf16 gap itself: "within bf16 noise" = max |fast - ref| <= 1.5 x max |ref - fp32|.

    python benchmarks/loss_parity.py --assets .gpu_assets/smollm2-135m            # GPU, 200 steps
    python benchmarks/loss_parity.py --assets DIR --dry-run                        # CPU, tiny shape, 3 steps
    python benchmarks/loss_parity.py --reuse benchmarks/results/loss_parity_h200_2026-11-29.json   # fast only

--assets is a folder with SmolLM2's config.json and tokenizer files (tokenizer.json, tokenizer_config.json,
chat_template.jinja; 3.5 MB, git-ignored, carried to the GPU machine). Expected GPU runtime: ~90 s on
one H200 (6 runs x 200 steps of batch 8 x <= 256 tokens: ~10-15 s each, launch-bound, plus Triton's
first compile); the dry run takes ~30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt")
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
"""--dry-run shape: the real config with these fields replaced (vocabulary kept)."""


def make_model_dir(assets: Path, out: Path, seed: int, tiny: bool) -> Path:
    """A model folder: random weights (bf16) of the config in `assets`, plus its tokenizer files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(assets)
    if tiny:
        for key, value in TINY.items():
            setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (assets / name).is_file():
            shutil.copy(assets / name, out / name)
    return out


def run_curve(model_dir: Path, method: str, precision: str, fast: str, args: argparse.Namespace,
              out: Path) -> tuple[list[float], float]:
    """(loss per step, seconds) of one `run_training` with the fast path mode `fast`."""
    from rich.console import Console

    from slimtune.kernels import set_fast_path
    from slimtune.train import RunConfig, run_training

    set_fast_path(fast)
    data = {"path": "slimtune:wordnet_instruct", "max_rows": args.batch_size * args.steps}
    if args.dry_run:  # 2 held-out rows, not the shipped 200: under the Triton interpreter each one costs seconds
        from slimtune.data.loading import builtin_dataset_files

        small = out.parent / "eval_small.jsonl"
        small.write_text("".join(builtin_dataset_files(data["path"])[1].read_text().splitlines(True)[:2]))
        data["eval_path"] = str(small)
    cfg = RunConfig.from_dict({
        "model": str(model_dir), "method": method,
        "peft": {"r": 16, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
        "data": data,
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "max_seq_len": args.seq_len,
                  "lr": 1e-3, "warmup_steps": args.steps // 20, "scheduler": "cosine", "log_every": 1,
                  "save_every": args.steps, "precision": precision, "seed": args.seed, "device": args.device,
                  "report_to": []},
        "output_dir": str(out),
    })
    t0 = time.perf_counter()
    state = run_training(cfg, progress=False, console=Console(stderr=True, quiet=True)).state
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    losses = [row["loss"] for row in state.history if "loss" in row]
    set_fast_path("auto")
    return losses, time.perf_counter() - t0


def gaps(a: list[float], b: list[float]) -> tuple[float, float]:
    """(max, mean) of |a - b| over the steps both curves have."""
    if len(a) != len(b) or not a:
        raise ValueError(f"curves of {len(a)} and {len(b)} steps cannot be compared")
    d = [abs(x - y) for x, y in zip(a, b)]
    return max(d), sum(d) / len(d)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", type=Path, default=Path(".gpu_assets/smollm2-135m"))
    p.add_argument("--methods", nargs="*", default=["lora", "qlora"], choices=["lora", "qlora"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dry-run", action="store_true", help="tiny shape on CPU, 3 steps: checks the script")
    p.add_argument("--json", type=Path, help="also write the rows and curves here")
    p.add_argument("--reuse", type=Path, help="take the ref and fp32 curves from this earlier --json (same "
                   "settings and machine): only the fast path runs, e.g. after a fast-path change")
    args = p.parse_args(argv)
    if not (args.assets / "config.json").is_file():
        raise SystemExit(f"--assets {args.assets}: no config.json there (copy SmolLM2's config and tokenizer files)")
    if args.dry_run:
        args.steps, args.batch_size, args.seq_len, args.device = min(args.steps, 3), 2, 64, "cpu"
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    fast = "auto" if cuda else "on"  # auto is the shipped default; on CPU only "on" takes the fast path
    rows, curves = [], {}
    reused = json.loads(args.reuse.read_text())["curves"] if args.reuse else {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(args.assets, Path(tmp) / "model", args.seed, args.dry_run)
        for method in args.methods:
            runs = {}
            for name, precision, mode in (("fast", "bf16", fast), ("ref", "bf16", "off"), ("fp32", "fp32", "off")):
                if name != "fast" and f"{method}-{name}" in reused:
                    runs[name] = reused[f"{method}-{name}"][: args.steps], float("nan")
                else:
                    runs[name] = run_curve(model_dir, method, precision, mode, args, Path(tmp) / f"{method}-{name}")
                curves[f"{method}-{name}"] = runs[name][0]
                losses, seconds = runs[name]
                print(f"[parity] {method}-{name}: {len(losses)} steps in {seconds:.1f} s, first {losses[0]:.4f}, "
                      f"last {losses[-1]:.4f}", flush=True)
            (fast_l, fast_s), (ref_l, ref_s), (fp32_l, _) = runs["fast"], runs["ref"], runs["fp32"]
            max_fr, mean_fr = gaps(fast_l, ref_l)
            max_noise, mean_noise = gaps(ref_l, fp32_l)
            rows.append({"method": method, "steps": len(ref_l), "max_fast_ref": max_fr, "mean_fast_ref": mean_fr,
                         "max_bf16_fp32": max_noise, "mean_bf16_fp32": mean_noise, "final_fast": fast_l[-1],
                         "final_ref": ref_l[-1], "final_fp32": fp32_l[-1], "fast_s": fast_s, "ref_s": ref_s,
                         "ratio": max_fr / max(max_noise, 1e-12), "within_noise": max_fr <= 1.5 * max_noise})
    print_table(rows, "cuda" if cuda else "cpu", fast)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "curves": curves}, indent=1))
    return rows


def print_table(rows: list[dict], device: str, fast: str) -> None:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"loss parity on {name}: fast = SLIMTUNE_FAST_PATH={fast} bf16, ref = off bf16, fp32 = off fp32")
    print(f"{'method':7} {'steps':>5} {'max|f-r|':>9} {'mean|f-r|':>9} {'max|r-32|':>9} {'mean|r-32|':>10} "
          f"{'final f':>8} {'final r':>8} {'final 32':>8} {'f s':>6} {'r s':>6} {'ratio':>6}  within noise")
    for r in rows:
        print(f"{r['method']:7} {r['steps']:5d} {r['max_fast_ref']:9.4f} {r['mean_fast_ref']:9.4f} "
              f"{r['max_bf16_fp32']:9.4f} {r['mean_bf16_fp32']:10.4f} {r['final_fast']:8.4f} {r['final_ref']:8.4f} "
              f"{r['final_fp32']:8.4f} {r['fast_s']:6.1f} {r['ref_s']:6.1f} {r['ratio']:6.2f}  "
              f"{'yes' if r['within_noise'] else 'NO'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
