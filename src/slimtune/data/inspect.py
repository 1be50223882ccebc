"""Backend of `slimtune data inspect`: dataset stats and one rendered sample whose loss-bearing
tokens are marked, so a user sees exactly what the model will be trained to say."""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.data.config import DataConfig
from slimtune.data.pipeline import DataStats, build_datasets
from slimtune.data.tokenize import IGNORE_INDEX, Example

OPEN, CLOSE = "⟦", "⟧"
"""Plain-text markers around loss-bearing spans (rare characters, unlike [ ] in llama2's [INST])."""


@dataclass
class InspectReport:
    """Stats of a built dataset plus one sample split into (text, trained) spans."""

    path: str
    stats: DataStats
    max_seq_len: int
    sample_spans: list[tuple[str, bool]]
    added_tokens: list[str]
    mapping: str = ""
    """data.columns and data.roles as "your name -> format name" pairs; empty without a mapping."""

    def render(self, markup: bool = False) -> str:
        """A readable report. Trained spans sit inside ⟦ ⟧, or with markup=True in green rich markup
        (for a colour terminal only: piped or NO_COLOR output would lose the colour, and with it the mask)."""
        s = self.stats
        lengths = s.length_summary()
        lines = [
            f"data: {self.path}  (format {s.format}, template {s.template}, max_seq_len {self.max_seq_len})",
            f"rows read: {s.rows_read}   skipped: {s.rows_skipped}",
        ]
        if self.mapping:
            lines.insert(1, f"mapped: {self.mapping}")
        lines += [f"  skipped: {reason}" for reason in s.skip_reasons]
        lines += [
            f"examples: train {s.train_examples}, eval {s.eval_examples}"
            + (f", packed into {s.packed_rows} rows" if s.packed_rows else ""),
            f"tokens per train example: min {lengths['min']}, mean {lengths['mean']:.1f}, "
            f"p95 {lengths['p95']}, max {lengths['max']}",
            f"truncated: {s.truncated_rows} rows, {s.truncated_tokens} tokens dropped; "
            f"dropped with no loss tokens left: {s.dropped_no_loss}",
            f"loss-bearing tokens: {s.loss_fraction:.1%} of {s.total_tokens}",
        ]
        if self.added_tokens:
            lines.append(f"tokens added to the tokenizer (resize embeddings): {', '.join(self.added_tokens)}")
        legend = ("[bold green]green[/] text is trained (loss-bearing)" if markup
                  else f"text inside {OPEN} {CLOSE} is trained (loss-bearing)")
        lines += ["", f"sample ({legend}; the rest is masked, no loss):", self.sample_text(markup)]
        return "\n".join(lines)

    def sample_text(self, markup: bool = False) -> str:
        if markup:
            from rich.markup import escape

            return "".join(f"[bold green]{escape(t)}[/]" if on else escape(t) for t, on in self.sample_spans)
        return "".join(f"{OPEN}{t}{CLOSE}" if on else t for t, on in self.sample_spans)


def marked_spans(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """Decode an example into maximal runs of masked / trained tokens."""
    spans: list[tuple[str, bool]] = []
    run: list[int] = []
    state = None
    for token_id, label in zip(example["input_ids"], example["labels"], strict=True):
        trained = label != IGNORE_INDEX
        if state is not None and trained != state:
            spans.append((tokenizer.decode(run), state))
            run = []
        run.append(token_id)
        state = trained
    if run:
        spans.append((tokenizer.decode(run), bool(state)))
    return spans


def inspect_data(cfg: DataConfig, tokenizer, max_seq_len: int, seed: int = 0, sample_index: int = 0) -> InspectReport:
    """Build the datasets of `cfg` as training would and report on them."""
    data = build_datasets(cfg, tokenizer, max_seq_len, seed)
    examples = data.unpacked_train
    spans = marked_spans(examples[min(sample_index, len(examples) - 1)], tokenizer) if examples else []
    mapping = [f"{source} -> {target}" for target, source in cfg.columns.items()]
    mapping += [f"role {value!r} -> {role!r}" for value, role in cfg.roles.items()]
    return InspectReport(cfg.path, data.stats, max_seq_len, spans, data.added_tokens, ", ".join(mapping))
