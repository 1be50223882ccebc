"""LoraLayer: wraps a linear-like layer (nn.Linear, GPT-2 Conv1D, Linear4bit) or an nn.Embedding.

forward(x) = base_layer(x) + sum over active adapters of adapter(x). Merging folds the adapters into
the base weight; a 4-bit base is never re-quantized: merge it only through `unloaded(merge=True)`,
which returns a plain nn.Linear in the compute dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.adapter_layer import AdapterLayerBase, is_4bit, linear_features


class LoraLayer(AdapterLayerBase):
    """A base layer plus named LoRA adapters (see adapter_layer.AdapterLayer)."""

    method = "LoRA"
    layer_types = "nn.Linear, Conv1D (GPT-2), Linear4bit, nn.Embedding"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        self._dora_norms: dict[str, torch.Tensor | None] = {}

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return super().accepts(module) or isinstance(module, nn.Embedding)

    # ---- shape of the base weight, seen as (out, in) --------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in) for linear layers, (num_embeddings, dim) for embeddings."""
        base = self.base_layer
        weight = base.dequantize() if is_4bit(base) else base.weight
        return weight.T if self.fan_in_fan_out else weight

    def write_weight(self, weight: torch.Tensor) -> None:
        """Store `weight`, seen as base_weight() sees it, into the base layer (in its layout and dtype)."""
        target = self.base_layer.weight
        target.data.copy_((weight.T if self.fan_in_fan_out else weight).to(target.dtype))

    def features(self) -> tuple[int, int]:
        base = self.base_layer
        if self.is_embedding:
            return base.num_embeddings, base.embedding_dim
        return linear_features(base, self.fan_in_fan_out)

    # ---- merging (AdapterLayerBase) -----------------------------------------------------------
    def merge_one(self, name: str) -> None:
        weight = self.base_weight()
        delta, norm = self.adapters[name].delta_weight(weight)
        self.write_weight(weight.float() + delta)
        self._dora_norms[name] = norm

    def unmerge_one(self, name: str) -> None:
        self.write_weight(self.adapters[name].undo_delta(self.base_weight(), self._dora_norms.pop(name)))

    def folded(self, name: str, weight: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        delta, _ = self.adapters[name].delta_weight(weight)
        return weight + delta, bias

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        if not (args or kwargs) and self._fused_ok(x):
            return self._fused_forward(x)
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        pending = self.pending()
        if not pending:
            return result
        if self.is_embedding:
            for name in pending:
                result = result + self.adapters[name](x, self.base_layer)
            return result
        out_dtype = result.dtype
        needs_weight = any(self.adapters[n].lora_magnitude_vector is not None for n in pending)
        weight = self.base_weight() if needs_weight else None
        bias = getattr(self.base_layer, "bias", None)
        for name in pending:
            adapter = self.adapters[name]
            xa = x.to(adapter.lora_A.weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x
            result = result + adapter(xa, result, weight, bias)
        return result.to(out_dtype)

    # ---- fast path (kernels/lora_linear.py) -----------------------------------------------------
    def _fused_ok(self, x: torch.Tensor) -> bool:
        """One plain LoRA adapter (no dropout, no DoRA) on a frozen Linear/Linear4bit computing in x's dtype,
        or in the autocast dtype (kernels/lora_linear.py, Note: the fused op under autocast)."""
        if self.disabled or self.merged or self.is_embedding or self.fan_in_fan_out or len(self.active) != 1:
            return False
        from slimtune.kernels.dispatch import use_fused

        if not use_fused(x):
            return False
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        adapter = self.adapters[self.active[0]]
        if adapter.lora_magnitude_vector is not None or (
                not isinstance(adapter.lora_dropout, nn.Identity) and adapter.lora_dropout.training):
            return False
        base = self.base_layer
        if is_4bit(base):
            return dtype == base.compute_dtype
        return type(base) is nn.Linear and not base.weight.requires_grad and (autocast or dtype == base.weight.dtype)

    def fused_projection(self, x: torch.Tensor):
        """This layer as a kernels.lora_mlp.Projection when the fused path takes x (see _fused_ok), else None."""
        return self._projection() if self._fused_ok(x) else None

    def _projection(self):
        from slimtune.kernels.lora_mlp import Projection

        adapter, base = self.adapters[self.active[0]], self.base_layer
        state = base.quant_state if is_4bit(base) else None
        return Projection(base.weight, state, base.bias, adapter.lora_A.weight, adapter.lora_B.weight,
                          adapter.scaling)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        from slimtune.kernels.lora_linear import lora_linear

        p = self._projection()
        bias = None if p.bias is None else p.bias.to(x.dtype)
        out = lora_linear(x, p.weight, p.lora_a, p.lora_b, p.scaling, bias, p.state)
        return out.to(x.dtype) if p.state is not None else out  # Linear4bit answers in x's dtype, nn.Linear in autocast's
