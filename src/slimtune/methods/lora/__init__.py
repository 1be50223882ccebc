"""LoRA (with rsLoRA, DoRA, Gaussian and PiSSA init) on Linear, Conv1D, Linear4bit and Embedding."""

from __future__ import annotations

from torch import nn

from slimtune.adapter_layer import is_4bit, trainable_biases
from slimtune.architectures import column
from slimtune.methods.lora.adapters import LoraEmbeddingAdapter, LoraLinearAdapter
from slimtune.methods.lora.config import LoraConfig, pissa_iters
from slimtune.methods.lora.layer import LoraLayer
from slimtune.methods.spec import MethodSpec
from slimtune.targeting import default_targets, find_targets

__all__ = ["LoraConfig", "LoraLayer", "METHOD"]

def _make_adapter(layer: LoraLayer, name: str, config: LoraConfig) -> LoraLinearAdapter | LoraEmbeddingAdapter:
    r, alpha = config.rank_and_alpha(name)
    in_features, out_features = layer.features()
    if layer.is_embedding:
        if config.use_dora:
            raise ValueError(f"{name}: DoRA is not supported on embedding layers; leave it out of target_modules")
        adapter = LoraEmbeddingAdapter(in_features, out_features, r, alpha, config.use_rslora)
    else:
        adapter = LoraLinearAdapter(in_features, out_features, r, alpha, config.lora_dropout, config.use_rslora)
    return adapter


def inject(model: nn.Module, config: LoraConfig, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Wrap every target module of `model` in a LoraLayer and add adapter `adapter_name` to it."""
    targets = config.target_modules or default_targets(model, column("lora_targets"), "LoRA")
    names = find_targets(model, targets, exclude_modules=config.exclude_modules,
                         layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
                         skip=config.modules_to_save or ())
    niter = pissa_iters(config.init_lora_weights)
    for name in names:
        layer = LoraLayer.wrap(model, name, config)
        adapter = _make_adapter(layer, name, config)
        adapter.reset(config.init_lora_weights)
        if niter is not None:
            _pissa(layer, adapter, niter, name)
        device, dtype = layer.placement(autocast_adapter_dtype)
        adapter.to(device=device)  # DoRA's norm is taken where the base weight lives (a GPU, usually)
        if config.use_dora:
            adapter.init_dora(layer.base_weight().to(device))
        layer.add(adapter_name, adapter.to(dtype=dtype))


def _pissa(layer: LoraLayer, adapter: LoraLinearAdapter, niter: int, name: str) -> None:
    if layer.is_embedding or is_4bit(layer.base_layer):
        raise ValueError(f"{name}: PiSSA init needs a full-precision linear layer (not an embedding or 4-bit layer)")
    residual = adapter.pissa(layer.base_weight(), niter)
    layer.write_weight(residual)


METHOD = MethodSpec(config_cls=LoraConfig, inject=inject, extra_trainable=trainable_biases)
