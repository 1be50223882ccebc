"""QuantOptions: the 4-bit loading settings, read from our keywords or from a bitsandbytes-style config.

`load_model` accepts three spellings of the same settings, and this file turns each into one
validated QuantOptions:
  * ours:          quantization="nf4", double_quant=True, compute_dtype=torch.bfloat16, blocksize=64
  * the tutorial:  load_in_4bit=True, quantization_config={"bnb_4bit_quant_type": "nf4",
                   "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float16"}
  * a transformers.BitsAndBytesConfig (anything with `to_dict()`), e.g. read off a checkpoint.
Keys of a quantization_config override our keyword defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from slimtune.dtypes import dtype_name, parse_dtype
from slimtune.quant_format.nf4 import VALID_QUANT_TYPES
from slimtune.quant_format.state import check_blocksize

__all__ = ["QuantOptions", "resolve_options"]

# bitsandbytes config keys we read; the rest (int8 thresholds, storage dtype) do not apply to 4-bit here.
_IGNORED_KEYS = {
    "quant_method", "load_in_8bit", "_load_in_8bit", "_load_in_4bit", "llm_int8_threshold",
    "llm_int8_has_fp16_weight", "llm_int8_enable_fp32_cpu_offload", "bnb_4bit_quant_storage",
}  # fmt: skip


@dataclass(frozen=True)
class QuantOptions:
    """Validated settings for loading a model in 4 bits."""

    quant_type: str | None = "nf4"
    """"nf4", "fp4", or None to load without quantization."""
    double_quant: bool = True
    """Quantize the per-block absmax values too (QLoRA's double quantization)."""
    compute_dtype: torch.dtype = torch.bfloat16
    """dtype of matmuls and of every weight that is not quantized (embeddings, norms, lm_head)."""
    blocksize: int = 64
    """Weights per absmax block."""
    skip_modules: tuple[str, ...] = field(default_factory=tuple)
    """Module names (full dotted name or last component) kept as plain nn.Linear."""

    def __post_init__(self) -> None:
        if self.quant_type is not None and self.quant_type not in VALID_QUANT_TYPES:
            raise ValueError(
                f"quantization {self.quant_type!r} is not supported; allowed: {VALID_QUANT_TYPES} or None"
            )
        check_blocksize(self.blocksize)
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be true or false, got {self.double_quant!r}")
        if self.compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                f"compute_dtype {self.compute_dtype} is not supported; allowed: bfloat16, float16, float32"
            )


def parse_compute_dtype(value: torch.dtype | str, key: str) -> torch.dtype:
    """A torch.dtype as given; a name in dtypes.DTYPES, "torch." prefix allowed: "torch.float16" -> torch.float16."""
    if isinstance(value, torch.dtype):
        return value
    return parse_dtype(value.removeprefix("torch.") if isinstance(value, str) else value, key)


def _config_dict(quantization_config: Any) -> dict[str, Any]:
    if quantization_config is None:
        return {}
    if isinstance(quantization_config, Mapping):
        return dict(quantization_config)
    if hasattr(quantization_config, "to_dict"):
        return dict(quantization_config.to_dict())
    raise TypeError(
        f"quantization_config must be a dict or have to_dict() (e.g. transformers.BitsAndBytesConfig); "
        f"got {type(quantization_config).__name__}"
    )


def resolve_options(
    quantization: str | None,
    double_quant: bool,
    compute_dtype: torch.dtype | str,
    blocksize: int,
    skip_modules: tuple[str, ...] | list[str] | None,
    load_in_4bit: bool | None,
    quantization_config: Any,
) -> QuantOptions:
    """Merge our keywords with a bitsandbytes-style config (the config wins) into QuantOptions."""
    cfg = _config_dict(quantization_config)
    if cfg.get("load_in_8bit") or cfg.get("_load_in_8bit"):
        raise ValueError("quantization_config asks for load_in_8bit; slimtune loads 4-bit (nf4/fp4) only")
    unknown = sorted(set(cfg) - _IGNORED_KEYS - {
        "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
        "llm_int8_skip_modules", "bnb_4bit_blocksize",
    })  # fmt: skip
    if unknown:
        raise ValueError(f"quantization_config has unknown keys {unknown}")
    in_4bit = cfg.get("load_in_4bit", cfg.get("_load_in_4bit", load_in_4bit))
    quant_type = cfg.get("bnb_4bit_quant_type", quantization)
    if in_4bit is False:
        quant_type = None
    elif in_4bit and quant_type is None:
        quant_type = "nf4"
    skips = tuple(skip_modules or ()) + tuple(cfg.get("llm_int8_skip_modules") or ())
    return QuantOptions(
        quant_type=quant_type,
        double_quant=cfg.get("bnb_4bit_use_double_quant", double_quant),
        compute_dtype=parse_compute_dtype(cfg.get("bnb_4bit_compute_dtype") or compute_dtype, "compute_dtype"),
        blocksize=check_blocksize(cfg.get("bnb_4bit_blocksize", blocksize), "bnb_4bit_blocksize"),
        skip_modules=skips,
    )


def bnb_config_dict(options: QuantOptions) -> dict[str, Any]:
    """The config.json `quantization_config` transformers + bitsandbytes expect for a saved 4-bit model."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": dtype_name(options.compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": options.quant_type,
        "bnb_4bit_use_double_quant": options.double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(options.skip_modules) or None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
