"""What the layer methods (LoRA, IA3, AdaLoRA) share outside their layers: the LoRA fields AdaLoRA keeps and
checks the same way, the biases bias='all' / 'lora_only' train, wrapping a linear target, placing adapters.

The layers' own shared bookkeeping (set_active, delete, merge guards) lives in adapter_layer.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from slimtune.targeting import is_linear_like

if TYPE_CHECKING:
    from slimtune.methods.adalora.config import AdaLoraConfig
    from slimtune.methods.ia3.config import IA3Config
    from slimtune.methods.lora.config import LoraConfig

BIAS_CHOICES = ("none", "all", "lora_only")

_Layer = TypeVar("_Layer", bound=nn.Module)


def check_alpha_dropout_bias(config: LoraConfig | AdaLoraConfig) -> None:
    """lora_alpha > 0, lora_dropout in [0, 1), bias one of BIAS_CHOICES."""
    if not config.lora_alpha > 0:
        raise ValueError(f"lora_alpha={config.lora_alpha!r} must be > 0")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={config.lora_dropout!r} must be in [0, 1)")
    if config.bias not in BIAS_CHOICES:
        raise ValueError(f"bias={config.bias!r} is not valid; allowed: {', '.join(BIAS_CHOICES)}")


def trainable_biases(model: nn.Module, config: LoraConfig | AdaLoraConfig) -> Iterator[tuple[str, nn.Parameter]]:
    """Biases trained by bias='all' (every bias) or 'lora_only' (the adapted layers' own biases)."""
    if config.bias == "none":
        return
    for name, param in model.named_parameters(remove_duplicate=False):
        if not name.endswith("bias") or ".adapters." in name or ".original_module." in name:
            continue
        if config.bias == "all" or name.endswith(".base_layer.bias"):
            yield name, param


def wrap_linear(model: nn.Module, name: str, config: IA3Config | AdaLoraConfig, layer_cls: type[_Layer],
                method: str) -> _Layer:
    """Put a `layer_cls` wrapper around the linear-like module `name` of `model` (or return the one already there).

    Conv1D stores (in, out), so fan_in_fan_out follows the module; as peft, a config that says otherwise gets a
    warning and is corrected, so the saved config says what was used. `method` names the method in errors.
    """
    module = model.get_submodule(name)
    if isinstance(module, layer_cls):
        return module
    if not is_linear_like(module):
        raise ValueError(
            f"{method} cannot adapt module {name!r} of type {type(module).__name__}; supported layer types: "
            "nn.Linear, Conv1D (GPT-2), Linear4bit"
        )
    fan_in_fan_out = type(module).__name__ == "Conv1D"
    if config.fan_in_fan_out != fan_in_fan_out:
        warnings.warn(f"{name}: {type(module).__name__} uses fan_in_fan_out={fan_in_fan_out}; using that", stacklevel=3)
        config.fan_in_fan_out = fan_in_fan_out
    layer = layer_cls(module, fan_in_fan_out=fan_in_fan_out)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)
    return layer


def adapter_placement(base: nn.Module, four_bit: bool,
                      autocast_adapter_dtype: bool) -> tuple[torch.device, torch.dtype]:
    """Adapters live on the base layer's device; bf16/fp16 (and 4-bit) bases get fp32 adapters (peft's default),
    or the base's own (compute) dtype with autocast_adapter_dtype=False."""
    if four_bit:
        return base.weight.device, torch.float32 if autocast_adapter_dtype else base.compute_dtype
    weight = base.weight
    low = weight.dtype in (torch.bfloat16, torch.float16)
    return weight.device, torch.float32 if (low and autocast_adapter_dtype) else weight.dtype
