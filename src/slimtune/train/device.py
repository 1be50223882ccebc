"""Where a run computes and in which precision: device choice and the autocast dtype."""

from __future__ import annotations

import torch
from torch import nn

from slimtune.dtypes import SHORT_NAMES, parse_dtype


def resolve_device(name: str | None) -> torch.device:
    """`name` as a torch.device; None picks cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device: {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but CUDA is not available here; use cpu or null")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a GPU that supports it, else fp32; other values unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` (None for fp32: no autocast)."""
    dtype = parse_dtype(resolve_precision(precision, device), "train.precision", SHORT_NAMES)
    return None if dtype == torch.float32 else dtype


def weights_dtype(precision: str, device: torch.device) -> torch.dtype:
    """dtype to load frozen base weights in: the compute dtype (fp32 when not autocasting)."""
    return autocast_dtype(precision, device) or torch.float32


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
