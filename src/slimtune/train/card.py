"""The run's model card (output_dir/README.md): base model, method, data, schedule and final losses."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from slimtune.train.run_config import RunConfig
from slimtune.train.state import TrainState


def write_model_card(path: Path, cfg: RunConfig, state: TrainState, stats: Any, artifact: str) -> Path:
    path.write_text(model_card(cfg, state, stats, artifact))
    return path


def model_card(cfg: RunConfig, state: TrainState, stats: Any, artifact: str) -> str:
    t = cfg.train
    loss, eval_loss = state.last("loss"), state.last("eval_loss")
    lines = [
        "---",
        yaml.safe_dump({"base_model": cfg.model, "library_name": "slimtune" if artifact == "adapter" else
                        "transformers", "tags": ["slimtune", cfg.method, "sft"]}, sort_keys=False).strip(),
        "---",
        f"# {Path(cfg.output_dir).name}",
        "",
        f"Fine-tuned from `{cfg.model}` with **{cfg.method}** by slimtune.",
        "",
        "| | |", "|---|---|",
        f"| method | {cfg.method} {_peft_summary(cfg.peft)} |",
        f"| data | `{cfg.data.path}` ({stats.format}, template {stats.template}): {stats.train_examples} train / "
        f"{stats.eval_examples} eval examples |",
        f"| steps | {state.step} optimizer steps, {state.tokens_seen:,} tokens"
        + (f", stopped early ({state.stop_reason})" if state.stop_reason else "") + " |",
        f"| batch | {t.batch_size} x {t.grad_accum} accumulation, max_seq_len {t.max_seq_len} |",
        f"| optimizer | AdamW lr {t.lr:g}, {t.scheduler} schedule, weight decay {t.weight_decay:g}, "
        f"precision {t.precision} |",
        f"| final train loss | {_fmt(loss)} |",
        f"| final eval loss | {_fmt(eval_loss)}"
        + (f" (perplexity {math.exp(min(eval_loss, 700)):.2f})" if eval_loss is not None else "") + " |",
    ]
    if state.best_eval_loss is not None:
        lines.append(f"| best eval loss | {state.best_eval_loss:.4f} at step {state.best_step} |")
    lines += ["", "## Use", "", "```python", *_usage(cfg.model, artifact), "```", ""]
    return "\n".join(lines)


def _peft_summary(peft: dict[str, Any]) -> str:
    keys = ("r", "lora_alpha", "target_modules", "num_virtual_tokens")
    shown = {k: peft[k] for k in keys if k in peft}
    return "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else ""


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _usage(model: str, artifact: str) -> list[str]:
    if artifact == "model":
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{artifact}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{artifact}")']
    return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
            "from slimtune import PeftModel",
            f'base = AutoModelForCausalLM.from_pretrained("{model}")',
            f'model = PeftModel.from_pretrained(base, "{artifact}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{artifact}")']
