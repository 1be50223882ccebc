"""IA3Layer: wraps a linear-like layer (nn.Linear, GPT-2 Conv1D, Linear4bit) and rescales it with learned vectors.

An (IA)^3 adapter is one vector `ia3_l`: shape (out, 1) scales the output rows (bias included), shape
(1, in) scales the input features (feedforward layers). Merging multiplies the base weight by the vector;
a 4-bit base is never re-quantized: merge it only through `unloaded(merge=True)`, which returns a plain
nn.Linear in the compute dtype. See adapter_layer.py for the protocol and the on-disk key names.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from slimtune.adapter_layer import AdapterLayerBase


class IA3Vector(nn.Module):
    """One adapter: `ia3_l` of shape (1, in) if feedforward else (out, 1).

    Creation draws torch.randn first and then fills ones, as peft does, so the random stream (and hence
    every later adapter's initial values) matches peft's for the same seed.
    """

    def __init__(self, in_features: int, out_features: int, feedforward: bool, init: bool) -> None:
        super().__init__()
        shape = (1, in_features) if feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.randn(shape))
        self.feedforward = feedforward
        if init:
            nn.init.constant_(self.ia3_l, 1.0)

    def as_weight_factor(self, fan_in_fan_out: bool) -> torch.Tensor:
        """The vector shaped to multiply the stored weight: (out, in) storage, or (in, out) if fan_in_fan_out."""
        return self.ia3_l.T if fan_in_fan_out else self.ia3_l


class IA3Layer(AdapterLayerBase):
    """A base layer plus named (IA)^3 vectors (see adapter_layer.AdapterLayer)."""

    method = "IA3"

    # ---- merging (AdapterLayerBase) -----------------------------------------------------------
    def merge_one(self, name: str) -> None:
        base, adapter = self.base_layer, self.adapters[name]
        base.weight.data = (base.weight.data * adapter.as_weight_factor(self.fan_in_fan_out)).to(base.weight.dtype)
        if not adapter.feedforward and base.bias is not None:
            base.bias.data = (base.bias.data * adapter.ia3_l.reshape(base.bias.shape)).to(base.bias.dtype)

    def unmerge_one(self, name: str) -> None:
        """Divide the vector back out (exact up to rounding; a zero entry cannot be undone)."""
        base, adapter = self.base_layer, self.adapters[name]
        factor = adapter.as_weight_factor(self.fan_in_fan_out)
        if bool((factor == 0).any()):
            warnings.warn("an (IA)^3 vector has zero entries: unmerging cannot restore those weights", stacklevel=3)
        factor = torch.where(factor == 0, torch.ones_like(factor), factor)
        base.weight.data = (base.weight.data / factor).to(base.weight.dtype)
        if not adapter.feedforward and base.bias is not None:
            base.bias.data = (base.bias.data / factor.reshape(base.bias.shape)).to(base.bias.dtype)

    def folded(self, name: str, weight: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        adapter = self.adapters[name]
        weight = weight * adapter.ia3_l.float()  # (out, 1) or (1, in) against (out, in)
        if not adapter.feedforward and bias is not None:
            bias = bias * adapter.ia3_l.float().view(-1)
        return weight, bias

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        pending = [self.adapters[n] for n in self.pending()]
        if self.disabled or not pending:
            return self.base_layer(x, *args, **kwargs)
        in_scale = _product([a.ia3_l for a in pending if a.feedforward])    # (in,)
        out_scale = _product([a.ia3_l for a in pending if not a.feedforward])  # (out,)
        if in_scale is not None:  # as peft: scale in the vector's dtype, feed the base in x's dtype
            x = (x.to(in_scale.dtype) * in_scale).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if out_scale is not None:
            result = (result * out_scale).to(result.dtype)
        return result


def _product(vectors: list[torch.Tensor]) -> torch.Tensor | None:
    """The element-wise product of flattened vectors, in order (peft's `ia3_scaling *= l.flatten()`)."""
    if not vectors:
        return None
    out = vectors[0].flatten()
    for v in vectors[1:]:
        out = out * v.flatten()
    return out
