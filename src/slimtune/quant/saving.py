"""save_quantized: write a 4-bit model as a transformers + bitsandbytes 4-bit checkpoint.

The folder gets config.json with a "bitsandbytes" quantization_config and model.safetensors whose
4-bit layers use bitsandbytes' keys (Linear4bit's state_dict, see quant/state.py), so both
`AutoModelForCausalLM.from_pretrained(folder)` (with bitsandbytes installed) and our `load_model`
read it without re-quantizing.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from slimtune.quant.linear4bit import Linear4bit
from slimtune.quant.options import QuantOptions, bnb_config_dict

__all__ = ["save_quantized"]


def _options_of(model: nn.Module) -> QuantOptions:
    """The one (quant_type, double_quant, compute_dtype) shared by every Linear4bit of `model`."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError(
            f"save_quantized: {type(model).__name__} has no Linear4bit layer; use save_pretrained"
        )
    kinds = {(m.quant_state.quant_type, m.quant_state.nested, m.compute_dtype) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(
            f"save_quantized: layers mix settings {sorted(map(str, kinds))}; a bitsandbytes config holds one "
            "(quant_type, double_quant, compute_dtype)"
        )
    quant_type, nested, compute_dtype = kinds.pop()
    # transformers leaves unlisted Linear layers unquantized only if named here (it always skips the head).
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    blocksize = next(iter(layers.values())).quant_state.blocksize
    return QuantOptions(quant_type, nested, compute_dtype, blocksize, tuple(plain))


def _unshared_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied tensors (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, torch.device]] = set()
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.device)
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor.detach().contiguous().cpu()
    return out


def save_quantized(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write `model` (from load_model, 4-bit) to `save_directory` as a bitsandbytes 4-bit checkpoint."""
    from safetensors.torch import save_file

    options = _options_of(model)
    os.makedirs(save_directory, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.quantization_config = bnb_config_dict(options)
    config.save_pretrained(save_directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(save_directory)
    save_file(
        _unshared_state_dict(model), os.path.join(save_directory, "model.safetensors"), {"format": "pt"}
    )
