"""The tutorial's method table, measured: every method on the same task and budget.

Runs `slimtune train` for each example config (examples/<method>.yaml) on SmolLM2-135M-Instruct
and the shipped WordNet rows with the same steps, batch, sequence length and seed, then prints
trainable parameters (%), peak memory, step time and the held-out loss; "base" is the model before
training (a LoRA run with lr 1e-12: B starts at zero and stays there, so the model is unchanged).

    python benchmarks/method_comparison.py [--steps 30] [--out docs/methods.md]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["lora", "qlora", "dora", "adalora", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning", "full"]


def run(method: str, model: str, args: argparse.Namespace, lr: str | None = None) -> dict:
    out = Path(args.workdir) / (method if lr is None else "base")
    cmd = [sys.executable, "-m", "slimtune", "train", f"examples/{method}.yaml", "--model", model,
           "--output_dir", str(out), "--train.max_steps", str(args.steps), "--train.batch_size", str(args.batch),
           "--train.grad_accum", "1", "--train.max_seq_len", str(args.seq), "--train.seed", "0",
           "--train.eval_every", "null", "--train.save_every", "100000", "--train.log_every", "1",
           "--data.max_rows", str(args.rows), "--train.precision", "fp32"]
    if lr is not None:
        cmd += ["--train.lr", lr]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        return {"method": method, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    text = " ".join(proc.stdout.split())
    found = re.search(r"([\d,]+) trainable of ([\d,]+) parameters", text)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {
        "method": method,
        "trainable": int(found.group(1).replace(",", "")) if found else None,
        "total": int(found.group(2).replace(",", "")) if found else None,
        "peak_gb": max(r.get("memory_gb", 0) for r in train_rows),
        "tokens_per_s": sum(r["tokens_per_s"] for r in train_rows[1:]) / max(1, len(train_rows) - 1),
        "final_train_loss": train_rows[-1]["loss"],
        "eval_loss": evals[-1] if evals else None,
        "wall_s": wall,
    }


def table(results: list[dict]) -> str:
    lines = ["| method | trainable params | trainable % | peak memory (GiB, RSS) | tokens/s | held-out loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {' '.join(r['error'])} | | | | |")
            continue
        pct = 100 * r["trainable"] / r["total"] if r["trainable"] else 0.0
        lines.append(f"| {r['method']} | {r['trainable']:,} | {pct:.3f} | {r['peak_gb']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['eval_loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rows", type=int, default=400, help="training rows used (the eval set is fixed)")
    parser.add_argument("--workdir", default="runs/method-comparison")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from slimtune import default_model_path

    model = str(default_model_path())
    results = [dict(run("lora", model, args, lr="1e-12"), method="base (no training)")]
    print(table(results), flush=True)
    for method in args.methods:
        results.append(run(method, model, args))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    if args.out:
        Path(args.out).write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
