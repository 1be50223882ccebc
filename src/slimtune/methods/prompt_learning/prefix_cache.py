"""Prefix keys/values as a transformers Cache: the forward and generation of prefix tuning.

The learned prefix (n, L * 2 * D) holds, for each of the n virtual positions, a key and a value for every
layer (D = heads * head_dim; key/value heads for grouped-query attention). It reaches the model as a
pre-filled cache of length n: `DynamicCache` for decoder-only models, `EncoderDecoderCache` (self-attention
prefix, empty cross-attention cache) for encoder-decoder models. The attention mask gets n ones in front;
positions of the real tokens start at n, as after any cache of length n.

# Note: peft's encoder-decoder prefix layout
For num_transformer_submodules=2 peft duplicates the (L * 2) key/value rows to (L * 4) and regroups them by
4 per layer as (self_k, self_v, cross_k, cross_v), then drops the cross-attention part. With L layers the
decoder's self-attention of layer i therefore reads rows 4i and 4i+1 of [rows, rows]: layer 0 reads layer
0's prefix, layer 1 reads layer 2's, ... The encoder gets no prefix. `_layer_kv` reproduces that regrouping
literally, so files move between peft and slimtune with the same meaning.

# Note: prefix tuning under gradient checkpointing
transformers' checkpointed decoder layers drop the cache (a cache that is written would be written twice
when backward replays the layer), so peft refuses prefix tuning with gradient checkpointing. A layer whose
cache is only *read* may keep it (the layer class flag `_can_checkpoint_with_cache`). In a training forward
slimtune therefore passes `ReadOnlyPrefix` layers, whose update returns [prefix, new] without storing
anything, and for the duration of the call sets that flag on the checkpointed layers and clears the
`gradient_checkpointing` flag of the modules above them (GPT-2's backbone reads it only to drop the cache;
the layers keep checkpointing themselves).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, EncoderDecoderCache

from slimtune.methods.prompt_learning.config import PromptLearningConfig


class ReadOnlyPrefix(CacheLayerMixin):
    """One layer's prefix keys/values, (B, H, n, d); update() returns [prefix, new] and stores nothing."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.device = keys.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2] + query_length, 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1


def _layer_kv(prompt: torch.Tensor, config: PromptLearningConfig, batch: int) -> list[torch.Tensor]:
    """Per layer, a (2 * S, B, H, n, d) stack of keys and values (S = num_transformer_submodules)."""
    n, heads, layers = config.num_virtual_tokens, config.num_attention_heads, config.num_layers
    kv = prompt[:n].unsqueeze(0).expand(batch, -1, -1).reshape(batch, n, layers * 2, heads, config.token_dim // heads)
    if config.num_transformer_submodules == 2:  # see Note: peft's encoder-decoder prefix layout
        kv = torch.cat([kv, kv], dim=2)
    return list(kv.permute(2, 0, 3, 1, 4).split(2 * config.num_transformer_submodules))


def _decoder_cache(model: nn.Module, kv: list[torch.Tensor], read_only: bool) -> Cache:
    if read_only:
        return Cache(layers=[ReadOnlyPrefix(t[0], t[1]) for t in kv])
    text_config = getattr(model, "config", None)
    text_config = text_config.get_text_config() if hasattr(text_config, "get_text_config") else text_config
    try:
        cache = DynamicCache(config=text_config)
    except (TypeError, AttributeError, ValueError):  # configs some cache layouts cannot read
        cache = DynamicCache()
    for index, t in enumerate(kv):
        cache.update(t[0], t[1], index)
    return cache


def build_cache(model: nn.Module, prompt: torch.Tensor, config: PromptLearningConfig, batch: int,
                read_only: bool = False) -> Cache:
    """The prefix as a cache of length n for `batch` rows, in the base model's dtype."""
    dtype = getattr(model, "dtype", prompt.dtype)
    kv = _layer_kv(prompt.to(dtype=dtype if dtype.is_floating_point else prompt.dtype), config, batch)
    if config.num_transformer_submodules == 1:
        return _decoder_cache(model, kv, read_only)
    self_attention = _decoder_cache(model, [t[:2] for t in kv], read_only)
    cache = EncoderDecoderCache(self_attention, DynamicCache())
    for index in range(len(kv)):  # the encoder output is new: cross-attention keys must be computed
        cache.is_updated[index] = False
    return cache


def cache_kwarg(model: nn.Module) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values` (older releases): what the forward accepts."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _batch_size(inputs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if inputs.get(key) is not None:
            return inputs[key].shape[0]
    raise ValueError("prefix tuning needs input_ids or inputs_embeds; got neither")


def _checkpointing(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(checkpointed layers, other modules whose gradient_checkpointing flag is on)."""
    on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    layers = [m for m in on if hasattr(type(m), "_can_checkpoint_with_cache")]
    return layers, [m for m in on if not hasattr(type(m), "_can_checkpoint_with_cache")]


@contextlib.contextmanager
def _keep_cache_when_checkpointing(layers: list[nn.Module], backbones: list[nn.Module]) -> Iterator[None]:
    """See Note: prefix tuning under gradient checkpointing."""
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    for module in backbones:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's value
        for module in backbones:
            module.gradient_checkpointing = True


def _extend_masks(inputs: dict[str, Any], config: PromptLearningConfig, encoder_decoder: bool) -> None:
    n = config.num_virtual_tokens
    key = "decoder_attention_mask" if encoder_decoder else "attention_mask"
    if (mask := inputs.get(key)) is not None:
        inputs[key] = torch.cat([torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device), mask], dim=1)


def forward(model: nn.Module, prompt: torch.Tensor, config: PromptLearningConfig, inputs: dict[str, Any]) -> Any:
    """The model's forward after a prefix cache of length n (logits cover the real tokens only)."""
    inputs = dict(inputs)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    _extend_masks(inputs, config, encoder_decoder)
    if (positions := inputs.get("position_ids")) is not None:
        inputs["position_ids"] = positions + config.num_virtual_tokens
    layers, backbones = _checkpointing(model) if model.training and torch.is_grad_enabled() else ([], [])
    if layers and not encoder_decoder:
        inputs[cache_kwarg(model)] = build_cache(model, prompt, config, _batch_size(inputs), read_only=True)
        with _keep_cache_when_checkpointing(layers, backbones):
            return model(**inputs)
    if layers or backbones:
        raise ValueError("prefix tuning with gradient checkpointing is supported for decoder-only models; "
                         f"{type(model).__name__} is encoder-decoder: disable gradient checkpointing")
    inputs[cache_kwarg(model)] = build_cache(model, prompt, config, _batch_size(inputs))
    return model(**inputs)


def generate(model: nn.Module, prompt: torch.Tensor, config: PromptLearningConfig, inputs: dict[str, Any]) -> Any:
    """model.generate continuing from the prefix cache; the output is what generate returns without a prefix."""
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("generate with a prefix-tuning adapter needs input_ids")
    inputs = dict(inputs)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if not encoder_decoder:
        if inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones_like(input_ids)
        # the mask covers [prefix, tokens] and input_ids only the tokens: generate runs all of them after the cache
        _extend_masks(inputs, config, encoder_decoder=False)
    elif inputs.get("decoder_attention_mask") is not None:
        _extend_masks(inputs, config, encoder_decoder=True)
    inputs.pop("position_ids", None)
    inputs[cache_kwarg(model)] = build_cache(model, prompt, config, input_ids.shape[0])
    return model.generate(**inputs)
