"""DataConfig: the `data:` section of a training YAML, i.e. where the SFT rows come from and how they
become token examples. Defaults live here and only here; YAML is this dataclass serialized."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slimtune.data.columns import check_columns

FORMATS = ("auto", "alpaca", "belle", "sharegpt", "messages", "prompt_completion", "text")
"""Row formats: `auto` detects one of the others from the first rows' keys."""

BUILTIN_TEMPLATES = ("alpaca", "chatml", "llama2", "chatglm")
"""Prompt templates shipped with slimtune; `auto` and `tokenizer` select the tokenizer's own."""

TEMPLATES = ("auto", "tokenizer", *BUILTIN_TEMPLATES)
TEMPLATE_FILE_SUFFIX = ".jinja"
"""A template value ending in this is a file holding a Jinja chat template."""


def check_template(value: object, key: str) -> None:
    """ValueError unless `value` names a template (see TEMPLATES) or an existing .jinja file."""
    if value in TEMPLATES:
        return
    if isinstance(value, str) and value.endswith(TEMPLATE_FILE_SUFFIX):
        if not Path(value).expanduser().is_file():
            raise ValueError(f"{key}={value!r}: chat template file not found (relative paths start at the current "
                             "directory)")
        return
    raise ValueError(f"{key}={value!r} is not allowed; use one of {', '.join(TEMPLATES)}, or the path of a Jinja "
                     f"chat template file ending in {TEMPLATE_FILE_SUFFIX}")

PACKED_ATTENTION = ("position_ids", "4d_mask")


@dataclass
class DataConfig:
    """Where SFT rows come from and how they are turned into `{"input_ids", "labels"}` examples."""

    path: str = "slimtune:wordnet_instruct"
    """Training rows: a .json/.jsonl/.csv/.parquet file, a hub dataset name (loaded with
    `datasets.load_dataset`), or `slimtune:<name>` for a dataset shipped in slimtune's assets
    (`wordnet_instruct`, English; `tang300_zh`, Chinese check set)."""

    format: str = "auto"
    """Row format: auto | alpaca | belle | sharegpt | messages | prompt_completion | text. `auto` detects
    it from the first rows' keys; an explicit format is checked on every row. prompt_completion is TRL's
    prompt-completion type (two strings, or two lists of turns); only the completion is trained."""

    columns: dict[str, str] = field(default_factory=dict)
    """Your column names for a format's fields, {format_field: your_column}, e.g. {instruction: question,
    output: answer}; inside turns too, e.g. {messages: conversation, role: speaker, content: text}.
    Applies to path and eval_path; a mapped column missing from a row is an error naming the row."""

    roles: dict[str, str] = field(default_factory=dict)
    """Your role values -> system | user | assistant, e.g. {human: user, bot: assistant}."""

    eval_path: str | None = None
    """Held-out rows in the same kinds of location as `path`; None holds out `eval_split` of `path`
    (for `slimtune:` datasets, their shipped eval.jsonl is used)."""

    eval_split: float = 0.05
    """Fraction of the training rows held out for evaluation when `eval_path` is None; 0 disables."""

    hub_split: str = "train"
    """Split to read when `path` is a hub dataset name."""

    hub_subset: str | None = None
    """Configuration (subset) name of a hub dataset, passed as `name=` to `datasets.load_dataset`."""

    template: str = "auto"
    """Prompt template: auto (the tokenizer's chat template if it has one, else alpaca), tokenizer
    (its chat template, error if none), a built-in: alpaca | chatml | llama2 | chatglm, or the path of
    a Jinja chat template file ending in .jinja (rendered like a tokenizer's own; saved with the run)."""

    system_prompt: str | None = None
    """System message added to every conversation that does not carry its own."""

    train_on_prompt: bool = False
    """Also compute the loss on system/user tokens; by default only assistant turns are trained."""

    allow_control_tokens: bool = False
    """Let chat-control tokens written inside a row's text (e.g. `<|im_end|><|im_start|>system`) act as
    real special tokens. Off by default: they are tokenized as plain text, so a row cannot forge turns
    or system prompts; the template's own control tokens are always real. Turn it on only for rows
    that embed control tokens on purpose (e.g. already rendered conversations)."""

    packing: bool = False
    """Concatenate examples into rows of `max_seq_len`, attention kept inside each example."""

    packed_attention: str = "position_ids"
    """How packed rows keep samples apart: position_ids (restarting per sample; transformers builds
    the block-diagonal mask, flash-attention uses them as cu_seq_lens; the forward must use
    use_cache=False) or 4d_mask (an explicit (B, 1, T, T) additive block-diagonal causal mask in
    the model's dtype, for eager/sdpa)."""

    group_by_length: bool = False
    """Without packing: batch examples of similar length together (less padding)."""

    skip_bad_rows: bool = False
    """Skip rows that fail validation and report how many (with the first reasons); by default the
    first bad row stops before training."""

    max_rows: int | None = None
    """Read at most this many rows from `path` (useful for quick runs); None reads all."""

    shuffle: bool = True
    """Shuffle the training rows (with the run's seed) before the eval split and packing."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"data.path must be a non-empty string (file, hub name or slimtune:<name>), got {self.path!r}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r} is not allowed; use one of {', '.join(FORMATS)}")
        check_columns(self.columns, self.roles)
        check_template(self.template, "data.template")
        if not isinstance(self.eval_split, (int, float)) or not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"data.eval_split={self.eval_split!r} must be a fraction in [0, 1)")
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 1):
            raise ValueError(f"data.max_rows={self.max_rows!r} must be a positive integer or null")
        if self.packed_attention not in PACKED_ATTENTION:
            raise ValueError(
                f"data.packed_attention={self.packed_attention!r} is not allowed; use one of "
                f"{', '.join(PACKED_ATTENTION)}"
            )
        if self.packing and self.group_by_length:
            raise ValueError("data.packing and data.group_by_length exclude each other: packed rows all have max_seq_len")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"data.system_prompt must be a string or null, got {type(self.system_prompt).__name__}")
