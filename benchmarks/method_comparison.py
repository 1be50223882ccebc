"""Every method on SmolLM2-135M-Instruct, same task and budget: the table of docs/methods.md.

Each method trains through `slimtune.train.run.run_training` (what `slimtune train` calls) on the
shipped WordNet rows with the same steps, batch, sequence length, schedule and seed; only the
learning rate is per method (the value commonly used for it, see METHODS). The "base" row is the
untouched model: loaded, evaluated and asked the prompt, never trained. "Before" is the held-out
loss of the model as prepared for the method, before its first step (LoRA-family adapters start as
the identity; soft prompts and the NF4 base do not). Each method runs in its own process, so the
peak resident memory (VmHWM, reset after the "before" evaluation) is that method's alone.

    python benchmarks/method_comparison.py [--steps 40] [--methods lora ia3] [--out table.md]
    python benchmarks/method_comparison.py --from-json --out table.md   # the table again, no training

Takes ~20 minutes on 2 idle CPU cores with the defaults; `--one METHOD --json FILE` is the child.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASET = "slimtune:wordnet_instruct"


@dataclass(frozen=True)
class Method:
    lr: float
    """Peak AdamW learning rate: the value commonly used for this method."""
    peft: dict[str, Any] = field(default_factory=dict)
    """The run YAML's `peft:` section."""


LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0}
INIT_TEXT = "Explain the meaning of the English word, or give a synonym, as a dictionary would."
METHODS: dict[str, Method] = {
    "lora": Method(1e-3, LORA),  # LoRA: 2e-4 (7B+) .. 1e-3 (small models, short runs)
    "dora": Method(1e-3, LORA),
    "qlora": Method(1e-3, LORA),  # same adapter on an NF4 + double-quant base
    "adalora": Method(1e-3, {"init_r": 12, "target_r": 8, "lora_alpha": 16, "target_modules": "all-linear",
                             "tinit": 8, "tfinal": 8, "deltaT": 4}),  # budgeting from step 8 to 32 of 40
    "ia3": Method(3e-2, {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    "prefix_tuning": Method(1e-2, {"num_virtual_tokens": 20}),
    "prompt_tuning": Method(3e-2, {"num_virtual_tokens": 20, "prompt_tuning_init": "TEXT",
                                   "prompt_tuning_init_text": INIT_TEXT}),  # + tokenizer_name_or_path
    "p_tuning": Method(1e-2, {"num_virtual_tokens": 20, "encoder_hidden_size": 128}),
    "full": Method(5e-5),  # full fine-tuning: 2e-5 .. 5e-5
}
ROWS = ["base", *METHODS]


@dataclass(frozen=True)
class Budget:
    """What every method gets; the table is only fair if these are equal."""

    steps: int = 40
    batch: int = 8
    seq: int = 128
    seed: int = 0


def run_config(method: str, model: str, train_path: str, eval_path: str, output_dir: Path, budget: Budget) -> Any:
    """The RunConfig of `method` ("base" gets full's: only its data section is used)."""
    from slimtune.train.run_config import RunConfig

    spec = METHODS.get(method, METHODS["full"])
    peft = dict(spec.peft)
    if method == "prompt_tuning":
        peft["tokenizer_name_or_path"] = model
    return RunConfig.from_dict({
        "model": model, "method": "full" if method == "base" else method, "peft": peft,
        "data": {"path": train_path, "eval_path": eval_path},
        "train": {"max_steps": budget.steps, "batch_size": budget.batch, "max_seq_len": budget.seq,
                  "seed": budget.seed, "lr": spec.lr, "warmup_steps": budget.steps // 10, "scheduler": "cosine",
                  "log_every": 1, "save_every": budget.steps, "keep_checkpoints": 1, "precision": "fp32",
                  "device": "cpu", "report_to": []},
        "output_dir": str(output_dir),
    })


def prepared(cfg: Any) -> tuple[Any, Any, Any, Any]:
    """(model, tokenizer, data, collate) built exactly as run_training builds them (same seed, same order)."""
    import torch

    from slimtune.data import SFTCollator, build_datasets
    from slimtune.train.rng import seed_everything
    from slimtune.train.run import batch_plan, build_model, load_tokenizer

    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg.data, tokenizer, cfg.train.max_seq_len, cfg.train.seed)
    total_steps = cfg.train.total_steps(batch_plan(cfg, data.train).steps_per_epoch(cfg.train.grad_accum))
    model = build_model(cfg, torch.device("cpu"), len(tokenizer) if data.added_tokens else None, total_steps)
    collate = SFTCollator(tokenizer.pad_token_id, packed_attention=cfg.data.packed_attention, mask_dtype=torch.float32)
    return model, tokenizer, data, collate


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) as print_trainable_parameters reports them (a packed 4-bit byte counts twice)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def held_out(model: Any, data: Any, collate: Any, batch: int) -> float:
    from slimtune.train.forward import evaluation_loss

    return evaluation_loss(model, data.eval, collate, batch)[0]  # what Trainer.evaluate computes


def measure(method: str, model: str, train_path: str, eval_path: str, workdir: Path, budget: Budget,
            prompt: list[dict[str, str]]) -> dict[str, Any]:
    """One row: counts and held-out loss before, then (methods) the real training run and its results."""
    from rich.console import Console

    from slimtune.cli.demo import answer
    from slimtune.train.run import run_training

    if method not in ROWS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(ROWS)}")
    cfg = run_config(method, model, train_path, eval_path, workdir / method, budget)
    net, tokenizer, data, collate = prepared(cfg)
    if method == "base":
        net.requires_grad_(False)  # full's preparation made every weight trainable; base trains nothing
    trainable, total = parameter_counts(net)
    row: dict[str, Any] = {"method": method, "lr": None if method == "base" else cfg.train.lr,
                           "trainable": trainable, "total": total, "before": held_out(net, data, collate, budget.batch)}
    if method == "base":
        row.update(answer=answer(net, tokenizer, data.template, prompt), peak_rss_gb=peak_rss_gb(),
                   load_avg_5min=os.getloadavg()[1])
        return row
    del net
    gc.collect()
    reset_peak_rss()
    result = run_training(cfg, progress=False, console=Console(stderr=True))
    history = result.state.history
    steps = [r for r in history if "loss" in r]
    seconds = [elapsed(r, prev) for prev, r in zip([None, *steps], steps)]
    row.update(
        after=result.state.last("eval_loss"), first_loss=steps[0]["loss"], last_loss=steps[-1]["loss"],
        steps=result.state.step, s_per_step=statistics.median(seconds[1:] or seconds),  # step 1 warms caches
        peak_rss_gb=peak_rss_gb(), load_avg_5min=os.getloadavg()[1],
        artifact_mb=sum(f.stat().st_size for f in result.artifact_dir.glob("*.safetensors")) / 2**20,
        answer=answer(result.model, result.tokenizer, result.data.template, prompt),
    )
    shutil.rmtree(result.output_dir / "checkpoints")  # resumable state (for full ~1.6 GB); the adapter stays
    return row


def elapsed(row: dict[str, Any], prev: dict[str, Any] | None) -> float:
    """Seconds of the steps logged in `row` (log_every 1: one step): its tokens / its tokens per second."""
    tokens = row["tokens_seen"] - (prev["tokens_seen"] if prev else 0)
    return tokens / row["tokens_per_s"]


def reset_peak_rss() -> None:
    """Linux: restart the VmHWM high-water mark from the current resident size (clear_refs 5)."""
    with contextlib.suppress(OSError):  # elsewhere ru_maxrss (the whole process) is what we get
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gb() -> float:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------------- table
def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700.0))


def format_table(rows: list[dict[str, Any]], answer_chars: int = 60) -> str:
    """Markdown table; a failed row shows its error, a missing number shows n/a."""
    lines = ["| method | lr | trainable params (%) | held-out loss before -> after | perplexity before -> after "
             "| s/step | CPU load (5 min) | peak RSS (GiB) | adapter file (MB) | greedy answer (truncated) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | | | |")
            continue
        pct = 100 * r["trainable"] / max(1, r["total"])
        after, base = r.get("after"), r["method"] == "base"
        text = " ".join(r["answer"].split()).replace("|", "\\|")
        text = text if len(text) <= answer_chars else text[: answer_chars - 3] + "..."
        lines.append(
            f"| {r['method']} | {'-' if base else _num(r['lr'], 'g')} | {r['trainable']:,} ({pct:.3g}%) "
            f"| {_num(r['before'], '.3f')}{'' if base else ' -> ' + _num(after, '.3f')} "
            f"| {_num(_ppl(r['before']), '.2f')}{'' if base else ' -> ' + _num(_ppl(after), '.2f')} "
            f"| {'-' if base else _num(r.get('s_per_step'), '.2f')} | {_num(r.get('load_avg_5min'), '.1f')} "
            f"| {_num(r['peak_rss_gb'], '.2f')} "
            f"| {'-' if base else _num(r.get('artifact_mb'), '.2f')} | {text} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- processes
def child(method: str, args: argparse.Namespace) -> None:
    from slimtune import default_model_path
    from slimtune.cli.demo import held_out_prompts, write_held_out

    workdir = Path(args.workdir)
    eval_path = write_held_out(workdir / "held_out.jsonl", args.held_out)
    budget = Budget(args.steps, args.batch, args.seq, args.seed)
    row = measure(method, str(default_model_path()), DATASET, str(eval_path), workdir, budget,
                  held_out_prompts(1)[0]["messages"])
    Path(args.json).write_text(json.dumps(row))


def spawn(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run `method` in a fresh process (replacing WORKDIR/METHOD); its log goes to WORKDIR/METHOD.log."""
    workdir = Path(args.workdir)
    out, log = workdir / f"{method}.json", workdir / f"{method}.log"
    out.unlink(missing_ok=True)
    shutil.rmtree(workdir / method, ignore_errors=True)  # an earlier run of this script
    cmd = [sys.executable, __file__, "--one", method, "--json", str(out), "--workdir", str(workdir),
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
           "--seed", str(args.seed), "--held-out", str(args.held_out)]
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0 or not out.is_file():
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or [f"exit code {code}"]
        return {"method": method, "error": f"{tail[0][:120]} (see {log})"}
    return dict(json.loads(out.read_text()), wall_s=time.perf_counter() - start)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=ROWS, choices=ROWS)
    parser.add_argument("--steps", type=int, default=Budget.steps)
    parser.add_argument("--batch", type=int, default=Budget.batch)
    parser.add_argument("--seq", type=int, default=Budget.seq)
    parser.add_argument("--seed", type=int, default=Budget.seed)
    parser.add_argument("--held-out", type=int, default=100, help="first N rows of the shipped eval file")
    parser.add_argument("--workdir", default="runs/method-comparison")
    parser.add_argument("--out", default=None, help="also write the markdown table (and rows as .json) here")
    parser.add_argument("--from-json", action="store_true",
                        help="no training: the table of the rows already in WORKDIR/METHOD.json (re-run one with --methods)")
    parser.add_argument("--one", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.one:
        child(args.one, args)
        return []
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        saved = Path(args.workdir) / f"{method}.json"
        rows.append(json.loads(saved.read_text()) if args.from_json and saved.is_file() else
                    {"method": method, "error": f"no {saved}"} if args.from_json else spawn(method, args))
        r = rows[-1]
        print(format_table([r]).splitlines()[-1], f"({r.get('wall_s', 0):.0f} s)", flush=True)
    table = format_table(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
