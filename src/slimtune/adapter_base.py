"""How the base model under an adapter was loaded, recorded in the adapter folder as base_quantization.json.

A QLoRA adapter was fit to the 4-bit base's rounding of every weight, so it belongs on the same 4-bit base,
wherever its folder is copied. The record is a file of its own rather than a field of adapter_config.json:
slimtune refuses unknown adapter_config.json fields and HF peft warns about them, while peft, vLLM and
transformers load an adapter folder through adapter_config.json and the weights file and never open other
files. `slimtune train` writes it beside every final adapter; loading for inference reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BASE_FILE = "base_quantization.json"
"""The record's file name inside an adapter folder."""

QUANTIZATIONS = ("none", "nf4", "fp4")
"""Recorded base quantizations: none (the base in its compute dtype), nf4 or fp4 (4-bit)."""


@dataclass(frozen=True)
class BaseQuantization:
    quantization: str
    """none, nf4 or fp4."""
    double_quant: bool
    """The 4-bit base's per-block scales were quantized too (ignored for none)."""


def write_base_quantization(folder: str | Path, record: BaseQuantization) -> Path:
    """Write `record` into adapter folder `folder`; returns the file's path."""
    if record.quantization not in QUANTIZATIONS:
        raise ValueError(f"base quantization {record.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    path = Path(folder) / BASE_FILE
    path.write_text(json.dumps({"quantization": record.quantization, "double_quant": record.double_quant},
                               indent=2) + "\n", encoding="utf-8")
    return path


def read_base_quantization(folder: str | Path) -> BaseQuantization | None:
    """The record in adapter folder `folder`, None if it has none; ValueError naming the file if it is malformed."""
    path = Path(folder) / BASE_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON object ({err}); delete it, or pass --quantization") from None
    if not isinstance(raw, dict) or set(raw) != {"quantization", "double_quant"}:
        raise ValueError(f"{path}: expected exactly the keys 'quantization' and 'double_quant'; got "
                         f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
    if raw["quantization"] not in QUANTIZATIONS:
        raise ValueError(f"{path}: quantization={raw['quantization']!r} is not one of {', '.join(QUANTIZATIONS)}")
    if not isinstance(raw["double_quant"], bool):
        raise ValueError(f"{path}: double_quant={raw['double_quant']!r} must be true or false")
    return BaseQuantization(raw["quantization"], raw["double_quant"])
