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

from slimtune.adapter_layer import (
    activate,
    base_layer_attribute,
    delete_adapter,
    linear_features,
    plain_linear,
    to_merge,
)
from slimtune.quant.linear4bit import Linear4bit


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


class IA3Layer(nn.Module):
    """A base layer plus named (IA)^3 vectors (see adapter_layer.AdapterLayer)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.fan_in_fan_out = fan_in_fan_out
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    def features(self) -> tuple[int, int]:
        """(in_features, out_features) of the base layer."""
        return linear_features(self.base_layer, self.fan_in_fan_out)

    # ---- AdapterLayer protocol ------------------------------------------------------------------
    def add(self, name: str, adapter: IA3Vector) -> None:
        self.adapters[name] = adapter

    def set_active(self, names: list[str], trainable: bool) -> None:
        self.active = activate(self.adapters, names, trainable)

    def delete(self, name: str) -> None:
        self.active = delete_adapter(self.adapters, name, self.active, self.merged)

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        if isinstance(self.base_layer, Linear4bit):
            raise ValueError(
                "cannot merge (IA)^3 into a 4-bit layer without re-quantizing it; use merge_and_unload(), which "
                "dequantizes the base and merges in the compute dtype"
            )
        base = self.base_layer
        for name in to_merge(names, self.adapters, self.merged):
            adapter = self.adapters[name]
            base.weight.data = (base.weight.data * adapter.as_weight_factor(self.fan_in_fan_out)).to(base.weight.dtype)
            if not adapter.feedforward and base.bias is not None:
                base.bias.data = (base.bias.data * adapter.ia3_l.reshape(base.bias.shape)).to(base.bias.dtype)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the merged vectors back out (exact up to rounding; a zero entry cannot be undone)."""
        base = self.base_layer
        while self.merged:
            adapter = self.adapters[self.merged.pop()]
            factor = adapter.as_weight_factor(self.fan_in_fan_out)
            if bool((factor == 0).any()):
                warnings.warn("an (IA)^3 vector has zero entries: unmerging cannot restore those weights", stacklevel=2)
            factor = torch.where(factor == 0, torch.ones_like(factor), factor)
            base.weight.data = (base.weight.data / factor).to(base.weight.dtype)
            if not adapter.feedforward and base.bias is not None:
                base.bias.data = (base.bias.data / factor.reshape(base.bias.shape)).to(base.bias.dtype)

    @torch.no_grad()
    def unloaded(self, merge: bool) -> nn.Module:
        """The base module to put back; with merge=True the active vectors are folded in first."""
        base = self.base_layer
        if merge and isinstance(base, Linear4bit):
            return self._merged_linear_from_4bit(base)
        if merge:
            self.merge([n for n in self.active if n not in self.merged])
        return base

    def _merged_linear_from_4bit(self, base: Linear4bit) -> nn.Linear:
        weight = base.dequantize().float()  # (out, in)
        bias = None if base.bias is None else base.bias.float()
        for name in self.active:
            adapter = self.adapters[name]
            weight = weight * adapter.ia3_l.float()
            if not adapter.feedforward and bias is not None:
                bias = bias * adapter.ia3_l.float().view(-1)
        return plain_linear(weight, bias, base.compute_dtype)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        pending = [self.adapters[n] for n in self.active if n not in self.merged]
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

    def __getattr__(self, name: str) -> Any:
        return base_layer_attribute(self, name)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"


def _product(vectors: list[torch.Tensor]) -> torch.Tensor | None:
    """The element-wise product of flattened vectors, in order (peft's `ia3_scaling *= l.flatten()`)."""
    if not vectors:
        return None
    out = vectors[0].flatten()
    for v in vectors[1:]:
        out = out * v.flatten()
    return out
