"""The bitsandbytes record of a 4-bit model, and save_quantized, which writes the model with it.

transformers recognizes a bitsandbytes 4-bit model by `config.quantization_config`; without it,
`AutoModelForCausalLM.from_pretrained(folder)` builds plain nn.Linear layers and refuses the packed
(n, 1) uint8 weights. `update_quantization_config` makes that record describe the model's Linear4bit
layers; `load_model` calls it, so `model.save_pretrained(folder)` writes a config.json with a
"bitsandbytes" quantization_config next to a model.safetensors whose 4-bit layers use bitsandbytes'
keys (Linear4bit's state_dict, see quant_format/state.py). Both `AutoModelForCausalLM.from_pretrained(folder)`
(with bitsandbytes installed) and our `load_model` read that folder without re-quantizing.
A model whose Linear4bit layers are later swapped for plain ones (a dequantizing merge) needs
`update_quantization_config` again before `save_pretrained`, as transformers' `dequantize()` drops
its record.
"""

from __future__ import annotations

import os

from torch import nn

from slimtune.quant.linear4bit import Linear4bit
from slimtune.quant.options import QuantOptions, bnb_config_dict

__all__ = ["save_quantized", "update_quantization_config"]


def _options_of(model: nn.Module, layers: dict[str, Linear4bit]) -> QuantOptions:
    """The one (quant_type, double_quant, compute_dtype) shared by the Linear4bit `layers` of `model`."""
    kinds = {(m.quant_state.quant_type, m.quant_state.nested, m.compute_dtype) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(
            f"{type(model).__name__}: 4-bit layers mix settings {sorted(map(str, kinds))}; a bitsandbytes "
            "config holds one (quant_type, double_quant, compute_dtype)"
        )
    quant_type, nested, compute_dtype = kinds.pop()
    # transformers leaves unlisted Linear layers unquantized only if named here (it always skips the head).
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    blocksize = next(iter(layers.values())).quant_state.blocksize
    return QuantOptions(quant_type, nested, compute_dtype, blocksize, tuple(plain))


def _linear4bit_layers(model: nn.Module) -> dict[str, Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def update_quantization_config(model: nn.Module) -> None:
    """Set `model.config.quantization_config` to the bitsandbytes config of its Linear4bit layers.

    A model with no Linear4bit layer (plain, or fully dequantized) loses the attribute instead, so
    its saved config.json reads as a full-precision checkpoint.
    """
    layers = _linear4bit_layers(model)
    if layers:
        model.config.quantization_config = bnb_config_dict(_options_of(model, layers))
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_quantized(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write `model` (from load_model, 4-bit) to `save_directory` as a bitsandbytes 4-bit checkpoint.

    This is `model.save_pretrained(save_directory)` after refreshing `model.config.quantization_config`
    from the layers, so it also holds for a model whose layers changed since `load_model`.
    """
    if not _linear4bit_layers(model):
        raise ValueError(
            f"save_quantized: {type(model).__name__} has no Linear4bit layer; use save_pretrained"
        )
    update_quantization_config(model)
    model.save_pretrained(save_directory)
