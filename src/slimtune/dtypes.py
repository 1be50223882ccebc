"""Floating-point dtypes by name: the one table of the spellings slimtune reads, and the name it writes.

A dtype arrives as text in four places, each taking its own subset of the spellings:
    train.precision                      SHORT_NAMES (fp32 | bf16 | fp16; "auto" resolved first)
    chat / serve / merge --dtype         SHORT_NAMES and TORCH_NAMES ("auto" resolved first)
    load_model(compute_dtype=...),       every name in DTYPES ("half" too), a "torch." prefix
      bnb_4bit_compute_dtype             or a torch.dtype
    a 4-bit quant state's "dtype" field  TORCH_NAMES, as bitsandbytes writes them

This module imports only torch, so any layer (the 4-bit format included) can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DTYPES", "SHORT_NAMES", "TORCH_NAMES", "dtype_name", "parse_dtype"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
"""Every accepted spelling -> its dtype."""

TORCH_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""torch's names (str(dtype) without "torch."): what transformers' and bitsandbytes' JSON hold."""

SHORT_NAMES: tuple[str, ...] = ("fp32", "bf16", "fp16")
"""The short names of run configs and command-line flags."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of `dtype`, without "torch.": torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: object, key: str, allowed: Sequence[str] = tuple(DTYPES)) -> torch.dtype:
    """The dtype that `value` spells, when it is a str among `allowed`; else ValueError naming `key`.

    `allowed` is the caller's list of accepted values and the error lists it. Only names in DTYPES
    parse here: a caller that also takes a value such as "auto" resolves it before calling and may
    list it in `allowed` so that the error names it.
    """
    if not isinstance(value, str) or value not in allowed or value not in DTYPES:
        raise ValueError(f"{key}={value!r} is not an allowed dtype; use one of {', '.join(allowed)}")
    return DTYPES[value]
