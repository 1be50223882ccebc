"""`slimtune train --help` text: every config key with its default and docstring, per section."""

from __future__ import annotations

from slimtune.train.config import TrainConfig
from slimtune.train.docs import describe_fields
from slimtune.train.run_config import QuantConfig, RunConfig

PEFT_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "use_dora",
             "init_lora_weights", "modules_to_save")
"""The LoRA keys shown in --help (the method's config class accepts more)."""


def config_help() -> str:
    """Markdown: the YAML layout, then one bullet per key of each section."""
    top = [r for r in describe_fields(RunConfig, "") if r[0] not in ("data", "train", "quant")]
    parts = [
        "**Config keys** (YAML sections; override any with `--section.key value`, e.g. `--train.lr 1e-4`):",
        _bullets(top),
        "**train:**", _bullets(describe_fields(TrainConfig, "train")),
        "**data:**", _bullets(_data_rows()),
        "**peft:** (method lora/qlora/dora; the fields of slimtune.LoraConfig)", _bullets(_peft_rows()),
        "**quant:** (method qlora)", _bullets(describe_fields(QuantConfig, "quant")),
    ]
    return "\n\n".join(p for p in parts if p)


def _bullets(rows: list[tuple[str, str, str]]) -> str:
    return "\n".join(f"* `{key}` ({default}): {doc}" for key, default, doc in rows)


def _data_rows() -> list[tuple[str, str, str]]:
    from slimtune.data import DataConfig

    return [r for r in describe_fields(DataConfig, "data") if r[0] != "data.extra"]


def _peft_rows() -> list[tuple[str, str, str]]:
    from slimtune import LoraConfig

    rows = {r[0]: r for r in describe_fields(LoraConfig, "peft")}
    return [rows[f"peft.{k}"] for k in PEFT_KEYS if f"peft.{k}" in rows]
