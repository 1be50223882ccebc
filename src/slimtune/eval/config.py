"""EvalConfig: what `slimtune eval` measures, on which model and data. Defaults live here only."""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.data.config import FORMATS, check_template
from slimtune.models import check_model_name


@dataclass
class EvalConfig:
    """One evaluation: perplexity and generation metrics of a base model and (optionally) its adapter."""

    model: str
    """Base model: a folder in Hugging Face format, a hub name or slimtune:smollm2-135m-instruct."""
    data: str
    """Held-out rows: a .json/.jsonl/.csv/.parquet file, a hub name, or `slimtune:<name>` (its eval split)."""
    output: str
    """Folder for metrics.json, samples.jsonl, report.md and chart.png (created)."""
    adapter: str | None = None
    """Adapter folder; when given, base and fine-tuned are evaluated side by side."""
    format: str = "auto"
    """Row format of `data` (as in training): auto | alpaca | belle | sharegpt | messages | text."""
    template: str = "auto"
    """Prompt template (as in training); auto uses the tokenizer's chat template (the adapter's if saved)."""
    system_prompt: str | None = None
    """System message added to conversations without one (use the training run's)."""
    max_samples: int | None = None
    """Evaluate at most this many rows (None: all)."""
    batch_size: int = 8
    """Rows per forward pass / per generation batch (left-padded)."""
    max_seq_len: int = 1024
    """Perplexity examples are truncated to this many tokens."""
    all_tokens: bool = False
    """Perplexity over every token instead of the assistant tokens only."""
    generate: bool = True
    """Compute generation metrics (BLEU, ROUGE, exact match) on rows that end with an assistant turn."""
    max_new_tokens: int = 128
    """Generation length cap for the answers (greedy decoding)."""
    judge: str | None = None
    """Local judge model folder (or a slimtune: name): grades each answer 1-10 and compares fine-tuned vs base
    (MT-Bench style)."""
    judge_max_new_tokens: int = 256
    """Generation length cap for the judge's explanations and verdicts."""
    quantization: str = "auto"
    """Base model loading: auto (4-bit for a QLoRA run's adapter) | none | nf4 | fp4."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16 | fp16."""
    device: str | None = None
    """torch device; None picks cuda when available, else cpu."""

    def __post_init__(self) -> None:
        check_model_name(self.model, "--model")
        if self.judge is not None:
            check_model_name(self.judge, "--judge")
        if self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r} is not allowed; use one of {', '.join(FORMATS)}")
        check_template(self.template, "--template")
        for name in ("batch_size", "max_seq_len", "max_new_tokens", "judge_max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ValueError(f"--max-samples {self.max_samples!r} must be a positive integer")
