"""The contract between PeftModel and the layers a method injects, the base class those layers share, the one
rule for wrapping a target module, plus the modules_to_save wrapper.

Every layer method (LoRA, IA3, AdaLoRA) wraps a base module and satisfies `AdapterLayer`; PeftModel
drives adapters only through this protocol, never by asking which method it holds. `AdapterLayerBase` keeps
the state every such layer has (`adapters`, the `active` and `merged` name lists, `disabled`) and answers
add / set_active / delete / merge / unmerge / unloaded once; a method's layer adds its arithmetic
(forward, and how one adapter folds into the weight).

# Note: adapter naming on disk
In memory a wrapper keeps each adapter in `adapters[<name>]`, so the state-dict key of a weight is
`...q_proj.adapters.default.lora_A.weight`. PEFT's file format stores the same weight as
`...q_proj.lora_A.weight`: saving drops `adapters.<name>.`, loading puts it back. modules_to_save
copies follow the same rule with `modules_to_save.<name>.`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from slimtune.targeting import is_linear_like


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


def is_4bit(module: nn.Module) -> bool:
    """True for a 4-bit linear layer (quant.Linear4bit): its weight is packed, `dequantize()` gives (out, in)."""
    return type(module).__name__ == "Linear4bit" and hasattr(module, "dequantize")


def linear_features(base: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like base layer (nn.Linear, GPT-2 Conv1D, Linear4bit)."""
    if hasattr(base, "in_features"):
        return base.in_features, base.out_features
    weight = base.weight  # Conv1D keeps (in, out)
    return tuple(weight.shape) if fan_in_fan_out else tuple(reversed(weight.shape))


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear holding `weight` (out, in) and `bias` in `dtype`: what a merged 4-bit layer becomes
    (dequantized, never re-quantized)."""
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    plain.weight.data.copy_(weight)
    if bias is not None:
        plain.bias.data.copy_(bias)
    return plain


class LayerConfig(Protocol):
    """What wrapping reads from a layer method's config (LoraConfig, IA3Config and AdaLoraConfig have it)."""

    fan_in_fan_out: bool


class BiasConfig(Protocol):
    """What `trainable_biases` reads from a config (LoraConfig and AdaLoraConfig have it)."""

    bias: str


_Layer = TypeVar("_Layer", bound="AdapterLayerBase")


class AdapterLayerBase(nn.Module):
    """A base layer plus named adapters: the bookkeeping of every AdapterLayer.

    A subclass sets `method` (its name in errors) and writes forward() and the three ways an adapter meets
    the weight: `merge_one` and `unmerge_one` change the stored base weight in place, `folded` returns a
    dequantized 4-bit weight (out, in) and bias with the adapter folded in.
    """

    method: ClassVar[str]
    layer_types: ClassVar[str] = "nn.Linear, Conv1D (GPT-2), Linear4bit"
    """The module types `accepts` takes, as named in errors."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.fan_in_fan_out = fan_in_fan_out
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    # ---- wrapping -----------------------------------------------------------------------------
    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether this layer can wrap `module` (a linear-like layer; LoRA also takes nn.Embedding)."""
        return is_linear_like(module)

    @classmethod
    def wrap(cls: type[_Layer], model: nn.Module, name: str, config: LayerConfig) -> _Layer:
        """Put a `cls` wrapper around module `name` of `model` (or return the one already there).

        Conv1D stores (in, out), so fan_in_fan_out follows the module; as peft, a config that says otherwise
        gets a warning and is corrected, so the saved config says what was used (embeddings have no layout).
        """
        module = model.get_submodule(name)
        if isinstance(module, cls):
            return module
        if not cls.accepts(module):
            raise ValueError(f"{cls.method} cannot adapt module {name!r} of type {type(module).__name__}; "
                             f"supported layer types: {cls.layer_types}")
        fan_in_fan_out = type(module).__name__ == "Conv1D"
        if config.fan_in_fan_out != fan_in_fan_out and not isinstance(module, nn.Embedding):
            warnings.warn(f"{name}: {type(module).__name__} uses fan_in_fan_out={fan_in_fan_out}; using that",
                          stacklevel=3)
            config.fan_in_fan_out = fan_in_fan_out
        layer = cls(module, fan_in_fan_out=fan_in_fan_out)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        return layer

    def features(self) -> tuple[int, int]:
        """(in_features, out_features) of the base layer."""
        return linear_features(self.base_layer, self.fan_in_fan_out)

    def placement(self, autocast_adapter_dtype: bool) -> tuple[torch.device, torch.dtype]:
        """Where a new adapter lives: the base layer's device; bf16/fp16 (and 4-bit) bases get fp32 adapters
        (peft's default), or the base's own (compute) dtype with autocast_adapter_dtype=False."""
        base = self.base_layer
        if is_4bit(base):
            return base.weight.device, torch.float32 if autocast_adapter_dtype else base.compute_dtype
        weight = base.weight
        low = weight.dtype in (torch.bfloat16, torch.float16)
        return weight.device, torch.float32 if (low and autocast_adapter_dtype) else weight.dtype

    # ---- AdapterLayer protocol ------------------------------------------------------------------
    def add(self, name: str, adapter: nn.Module) -> None:
        """Hold `adapter` as `name`, in the base layer's train/eval mode."""
        self.adapters[name] = adapter.train(self.base_layer.training)

    def set_active(self, names: list[str], trainable: bool) -> None:
        """Apply the `names` this layer holds, in order; only their weights require grad, and only if trainable."""
        self.active = [n for n in names if n in self.adapters]
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(trainable and name in self.active)

    def delete(self, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting")
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def pending(self) -> list[str]:
        """The active adapters that forward must still apply (not merged into the weight)."""
        return [n for n in self.active if n not in self.merged]

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        """Fold the named adapters this layer holds (each once, in order) into the stored base weight."""
        if is_4bit(self.base_layer):
            raise ValueError(
                "cannot merge into a 4-bit layer without re-quantizing it; use merge_and_unload(), which "
                f"dequantizes the base and merges the {self.method} adapters in the compute dtype"
            )
        for name in dict.fromkeys(n for n in names if n in self.adapters and n not in self.merged):
            self.merge_one(name)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, last first."""
        while self.merged:
            self.unmerge_one(self.merged.pop())

    @torch.no_grad()
    def unloaded(self, merge: bool) -> nn.Module:
        """The base module to put back; merge=True folds the active adapters in first. A 4-bit base becomes
        a plain nn.Linear in its compute dtype (dequantized, merged, never re-quantized)."""
        base = self.base_layer
        if merge and is_4bit(base):
            weight, bias = base.dequantize().float(), None if base.bias is None else base.bias.float()
            for name in self.active:
                weight, bias = self.folded(name, weight, bias)
            return plain_linear(weight, bias, base.compute_dtype)
        if merge:
            self.merge(self.pending())
        return base

    # ---- what a method's layer writes ----------------------------------------------------------
    def merge_one(self, name: str) -> None:
        """Fold adapter `name` into the stored base weight, in place."""
        raise NotImplementedError

    def unmerge_one(self, name: str) -> None:
        """Take adapter `name` back out of the stored base weight, in place."""
        raise NotImplementedError

    def folded(self, name: str, weight: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) with adapter `name` folded in: weight (out, in) and bias (out,) in float32."""
        raise NotImplementedError

    # ---- the wrapped module's attributes ---------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """Own attributes first (nn.Module's lookup), else the base layer's (weight, in_features, ...), so code
        that reads the original module's attributes keeps working."""
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            base = self.__dict__["_modules"].get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"


def trainable_biases(model: nn.Module, config: BiasConfig) -> Iterator[tuple[str, nn.Parameter]]:
    """Biases trained by bias='all' (every bias) or 'lora_only' (the adapted layers' own biases), by name."""
    if config.bias == "none":
        return
    for name, param in model.named_parameters(remove_duplicate=False):
        if not name.endswith("bias") or ".adapters." in name or ".original_module." in name:
            continue
        if config.bias == "all" or name.endswith(".base_layer.bias"):
            yield name, param


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
