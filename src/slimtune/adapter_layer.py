"""The contract between PeftModel and the layers a method injects, the bookkeeping those layers share, plus
the modules_to_save wrapper.

Every layer method (LoRA, IA3, AdaLoRA) wraps a base module and satisfies `AdapterLayer`; PeftModel
drives adapters only through this protocol, never by asking which method it holds. The layers keep the
same state (`adapters`, `active`, `merged` name lists, `disabled`) and answer set_active / delete / merge
guards / attribute lookups through the functions below, so the rules are written once.

# Note: adapter naming on disk
In memory a wrapper keeps each adapter in `adapters[<name>]`, so the state-dict key of a weight is
`...q_proj.adapters.default.lora_A.weight`. PEFT's file format stores the same weight as
`...q_proj.lora_A.weight`: saving drops `adapters.<name>.`, loading puts it back. modules_to_save
copies follow the same rule with `modules_to_save.<name>.`.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class AdapterLayer(Protocol):
    """A module that wraps `base_layer` and holds named adapters in `adapters`."""

    base_layer: nn.Module
    adapters: nn.ModuleDict
    disabled: bool

    def set_active(self, names: list[str], trainable: bool) -> None:
        """Make `names` the adapters applied in forward; their weights require grad if trainable."""

    def merge(self, names: list[str]) -> None:
        """Fold the named adapters into the base weight (forward output unchanged)."""

    def unmerge(self) -> None:
        """Undo every merge, restoring the base weight."""

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module to put back in the model; merge=True folds the active adapters in first."""

    def delete(self, name: str) -> None:
        """Remove adapter `name` (refused while it is merged)."""


def is_adapter_layer(module: nn.Module) -> bool:
    """True for a module that satisfies AdapterLayer.

    Not `isinstance(module, AdapterLayer)`: from Python 3.12 a runtime Protocol check reads attributes
    with inspect.getattr_static, which cannot see nn.Module children (base_layer, adapters), so every
    layer would fail the check and adapters would silently stay frozen.
    """
    children = module.__dict__.get("_modules", {})
    return "base_layer" in children and "adapters" in children and callable(getattr(module, "set_active", None))


def linear_features(base: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like base layer (nn.Linear, GPT-2 Conv1D, Linear4bit)."""
    if hasattr(base, "in_features"):
        return base.in_features, base.out_features
    weight = base.weight  # Conv1D keeps (in, out)
    return tuple(weight.shape) if fan_in_fan_out else tuple(reversed(weight.shape))


def activate(adapters: nn.ModuleDict, names: list[str], trainable: bool) -> list[str]:
    """The active list for set_active: the `names` that `adapters` holds, in order. Only their weights
    require grad, and only if `trainable`; every other adapter is frozen."""
    active = [n for n in names if n in adapters]
    for name, adapter in adapters.items():
        adapter.requires_grad_(trainable and name in active)
    return active


def delete_adapter(adapters: nn.ModuleDict, name: str, active: list[str], merged: list[str]) -> list[str]:
    """Remove adapter `name` from `adapters` (refused while it is merged); returns `active` without it."""
    if name in merged:
        raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting")
    del adapters[name]
    return [n for n in active if n != name]


def to_merge(names: list[str], adapters: nn.ModuleDict, merged: list[str]) -> list[str]:
    """The `names` a merge folds in, in order, each once: those `adapters` holds that are not merged yet."""
    return list(dict.fromkeys(n for n in names if n in adapters and n not in merged))


def base_layer_attribute(module: nn.Module, name: str) -> Any:
    """A wrapper's `__getattr__`: its own attribute (nn.Module's lookup), else the wrapped base layer's
    (weight, in_features, ...), so code that reads the original module's attributes keeps working."""
    try:
        return nn.Module.__getattr__(module, name)
    except AttributeError:
        base = module.__dict__["_modules"].get("base_layer")
        if base is None:
            raise
        return getattr(base, name)


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear holding `weight` (out, in) and `bias` in `dtype`: what a merged 4-bit layer becomes
    (dequantized, never re-quantized)."""
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    plain.weight.data.copy_(weight)
    if bias is not None:
        plain.bias.data.copy_(bias)
    return plain


class ModulesToSave(nn.Module):
    """Keeps the original module frozen and trains a full copy per adapter (e.g. a classifier head)."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def set_active(self, names: list[str], trainable: bool) -> None:
        self.active = next((n for n in names if n in self.modules_to_save), None)
        self.original_module.requires_grad_(False)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name == self.active)

    def current(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)
