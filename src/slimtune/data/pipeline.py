"""build_datasets: DataConfig + tokenizer -> train/eval token examples and the stats that go with them.

Steps, top to bottom: read rows -> detect/check the format -> convert and validate every row (stop
at the first bad row, or skip and count) -> add the system prompt -> shuffle and hold out eval ->
render + tokenize with loss masks (truncation counted) -> pack the train split if asked.
Eval examples are never packed: per-example losses stay exact.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

from slimtune.data.columns import check_columns_for_format, map_row
from slimtune.data.config import DataConfig
from slimtune.data.formats import Sample, detect_format, to_sample
from slimtune.data.loading import BUILTIN_PREFIX, RawRow, builtin_dataset_files, read_rows
from slimtune.data.packing import pack_examples
from slimtune.data.templates import ChatTemplate, resolve_template
from slimtune.data.tokenize import Example, loss_tokens, tokenize_sample
from slimtune.data.tokenizer_setup import prepare_tokenizer
from slimtune.data.validation import RowError, SkipLog

DETECT_ROWS = 10
"""How many first readable rows `format: auto` looks at."""


@dataclass
class DataStats:
    """What happened to the rows; every loss of data is counted here, never silent."""

    format: str = ""
    """Row format used (detected or configured)."""
    template: str = ""
    """Template used: a built-in name, or "tokenizer" for the tokenizer's own."""
    rows_read: int = 0
    """Rows read from path and eval_path together."""
    rows_skipped: int = 0
    """Bad rows skipped (skip_bad_rows: true)."""
    skip_reasons: list[str] = field(default_factory=list)
    """The first few skip reasons, each naming file, line/row and field."""
    train_examples: int = 0
    """Training examples after tokenization (before packing)."""
    eval_examples: int = 0
    """Eval examples after tokenization."""
    truncated_rows: int = 0
    """Examples (train and eval) cut to max_seq_len."""
    truncated_tokens: int = 0
    """Tokens cut off by that truncation."""
    dropped_no_loss: int = 0
    """Examples whose every loss-bearing token was cut by truncation (dropped, counted)."""
    packed_rows: int = 0
    """Packed training rows (0 without packing)."""
    lengths: list[int] = field(default_factory=list, repr=False)
    """Token length of every train example (after truncation, before packing)."""
    loss_tokens: int = 0
    """Loss-bearing tokens of the train examples."""
    total_tokens: int = 0
    """All tokens of the train examples."""

    def length_summary(self) -> dict[str, float]:
        """min / mean / p95 / max of the train example lengths (zeros when empty)."""
        if not self.lengths:
            return {"min": 0, "mean": 0.0, "p95": 0, "max": 0}
        ordered = sorted(self.lengths)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * (len(ordered) - 1) + 0.5))]
        return {"min": ordered[0], "mean": statistics.fmean(ordered), "p95": p95, "max": ordered[-1]}

    @property
    def loss_fraction(self) -> float:
        return self.loss_tokens / self.total_tokens if self.total_tokens else 0.0


@dataclass
class Datasets:
    """Result of build_datasets: lists of examples (usable as torch/HF datasets) and stats."""

    train: list[Example]
    """Training examples, or packed rows (with position_ids and seq_lens) when data.packing."""
    eval: list[Example]
    """Eval examples, never packed."""
    stats: DataStats
    """Counts and lengths for the run log and `slimtune data inspect`."""
    template: ChatTemplate
    """Template used; pass it to save_tokenizer_for_run."""
    added_tokens: list[str]
    """Tokens added to the tokenizer for the template: resize the model's embeddings if non-empty."""
    unpacked_train: list[Example] = field(default_factory=list, repr=False)
    """Training examples before packing (for inspection)."""


def build_datasets(cfg: DataConfig, tokenizer, max_seq_len: int, seed: int) -> Datasets:
    """Read, validate, tokenize (and pack) the data of `cfg`. Mutates `tokenizer`: see prepare_tokenizer."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len} must be at least 2")
    stats = DataStats()
    skips = SkipLog()
    template = resolve_template(cfg.template, tokenizer)
    added = prepare_tokenizer(tokenizer, template)
    stats.template = template.name

    train_path, eval_path = cfg.path, cfg.eval_path
    if cfg.path.startswith(BUILTIN_PREFIX) and eval_path is None:
        shipped_eval = builtin_dataset_files(cfg.path)[1]
        eval_path = str(shipped_eval) if shipped_eval else None
    train, fmt = load_samples(train_path, cfg, skips, max_rows=cfg.max_rows)
    evals, _ = load_samples(eval_path, cfg, skips) if eval_path else ([], fmt)
    stats.format = fmt
    stats.rows_read = skips.rows_read
    stats.rows_skipped, stats.skip_reasons = skips.count, skips.reasons
    rng = random.Random(seed)
    if cfg.shuffle:
        rng.shuffle(train)
    if not eval_path and cfg.eval_split > 0 and len(train) > 1:
        held = max(1, round(len(train) * cfg.eval_split))
        evals, train = train[:held], train[held:]
    if not train:
        raise ValueError(f"{cfg.path}: no usable training rows ({stats.rows_read} read, {stats.rows_skipped} skipped)")

    train_ex = _tokenize_all(train, tokenizer, template, max_seq_len, cfg, stats)
    if not train_ex:
        raise ValueError(f"{cfg.path}: all {len(train)} training examples lost every loss-bearing token to "
                         f"truncation at max_seq_len={max_seq_len} ({stats.truncated_tokens} tokens cut); "
                         "raise max_seq_len or shorten the prompts")
    stats.lengths = [len(ex["input_ids"]) for ex in train_ex]
    stats.loss_tokens = sum(loss_tokens(ex) for ex in train_ex)
    stats.total_tokens = sum(stats.lengths)
    eval_ex = _tokenize_all(evals, tokenizer, template, max_seq_len, cfg, stats)
    stats.train_examples, stats.eval_examples = len(train_ex), len(eval_ex)
    packed = pack_examples(train_ex, max_seq_len) if cfg.packing else train_ex
    if cfg.packing:
        stats.packed_rows = len(packed)
    return Datasets(packed, eval_ex, stats, template, added, unpacked_train=train_ex)


def load_samples(path: str, cfg: DataConfig, skips: SkipLog | None = None, max_rows: int | None = None,
                 fmt: str | None = None) -> tuple[list[Sample], str]:
    """Rows of `path` as validated canonical samples (system prompt added) and the format used.
    Bad rows raise RowError, or are counted in `skips` when cfg.skip_bad_rows. Useful on its own
    for generation-based evaluation, which needs the conversations rather than token ids."""
    skips = SkipLog() if skips is None else skips
    fmt = fmt or (cfg.format if cfg.format != "auto" else None)
    if fmt:
        check_columns_for_format(cfg.columns, fmt)
    rows = _mapped(read_rows(path, max_rows, cfg.hub_split, cfg.hub_subset), cfg)
    skips.rows_read += len(rows)
    if not fmt:
        fmt = _choose_format(rows)
        check_columns_for_format(cfg.columns, fmt)
    return _samples(rows, fmt, cfg, skips), fmt


def _mapped(rows: list[RawRow], cfg: DataConfig) -> list[RawRow]:
    """Rows with data.columns and data.roles applied; a row missing a mapped column carries its error."""
    if not (cfg.columns or cfg.roles):
        return rows
    out = []
    for row in rows:
        if row.error is not None:
            out.append(row)
            continue
        try:
            out.append(RawRow(row.where, map_row(row.data, cfg.columns, cfg.roles, row.where)))
        except RowError as error:
            out.append(RawRow(row.where, error=error))
    return out


def _choose_format(rows: list[RawRow]) -> str:
    readable = [(row.where, row.data) for row in rows if row.error is None][:DETECT_ROWS]
    first_error = next((row.error for row in rows if row.error is not None), None)
    if not readable and first_error is not None:  # say why the rows are unreadable, not only that they are
        raise first_error
    return detect_format(readable)


def _samples(rows: list[RawRow], fmt: str, cfg: DataConfig, skips: SkipLog) -> list[Sample]:
    out = []
    for row in rows:
        try:
            if row.error is not None:
                raise row.error
            sample = to_sample(row.data, fmt, row.where)
        except RowError as error:
            if not cfg.skip_bad_rows:
                raise RowError(error.where, error.field_name, f"{error.problem} [format {fmt}; set "
                               "data.skip_bad_rows: true to skip bad rows]") from None
            skips.add(error)
            continue
        out.append(_with_system(sample, cfg.system_prompt))
    return out


def _with_system(sample: Sample, system_prompt: str | None) -> Sample:
    if not system_prompt or sample.text is not None or sample.messages[0]["role"] == "system":
        return sample
    return Sample(sample.where, [{"role": "system", "content": system_prompt}, *sample.messages],
                  context_turns=sample.context_turns + 1 if sample.context_turns else 0)


def _tokenize_all(samples: list[Sample], tokenizer, template: ChatTemplate, max_seq_len: int, cfg: DataConfig,
                  stats: DataStats) -> list[Example]:
    out = []
    for sample in samples:
        example, dropped = tokenize_sample(sample, tokenizer, template, max_seq_len, cfg.train_on_prompt,
                                           cfg.allow_control_tokens)
        if dropped:
            stats.truncated_rows += 1
            stats.truncated_tokens += dropped
        if loss_tokens(example) == 0:
            stats.dropped_no_loss += 1
            continue
        out.append(example)
    return out
