"""Random-initialised Llama models of real shapes, built on the meta device and materialized layer by layer.

A 70B model does not fit in bf16 on one 141 GB card, so nothing is allocated for the whole model at
once: each decoder layer is materialized on the device (normal(0, 0.02) weights, unit norms) and its
seven projections are quantized before the next layer is touched. The same seed gives slimtune and the
baseline the same bf16 weights before quantization.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["PRESETS", "PROJECTIONS", "build_llama", "slimtune_quantizer", "bnb_quantizer", "flops_per_token"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PRESETS: dict[str, dict] = {  # LlamaConfig fields of the published models (weights random)
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,  # Llama-3.2-1B
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,  # Llama-3.1-8B
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,  # Llama-3-70B
                num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
}

Quantizer = Callable[[nn.Linear], nn.Module]


def slimtune_quantizer(linear: nn.Linear) -> nn.Module:
    """NF4 + double quantization, blocksize 64, bf16 compute (slimtune's Linear4bit)."""
    from slimtune.quant.linear4bit import Linear4bit

    return Linear4bit.from_linear(linear, "nf4", 64, True, compute_dtype=torch.bfloat16)


def bnb_quantizer(linear: nn.Linear) -> nn.Module:
    """The same settings through bitsandbytes' Linear4bit (as transformers' BitsAndBytesConfig builds it)."""
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                            device="meta")
    new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=64, compress_statistics=True,
                                   quant_type="nf4", module=new).to(linear.weight.device)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return new


def _init_(module: nn.Module) -> None:
    """Norm weights 1, everything else normal(0, 0.02) (Llama's initializer_range)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)


def build_llama(preset: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                quantizer: Quantizer | None = None, seed: int = 0, max_positions: int = 4096) -> nn.Module:
    """A LlamaForCausalLM of `preset` shape with random weights on `device`, its projections quantized."""
    import transformers as tf

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not known; allowed: {sorted(PRESETS)}")
    config = tf.LlamaConfig(**PRESETS[preset], max_position_embeddings=max_positions, use_cache=False)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config).to(dtype)
    torch.manual_seed(seed)
    inner = model.model
    for module in (inner.embed_tokens, inner.norm, *(() if config.tie_word_embeddings else (model.lm_head,))):
        module.to_empty(device=device)
        _init_(module)
    if config.tie_word_embeddings:
        model.lm_head.weight = inner.embed_tokens.weight
    inner.rotary_emb = type(inner.rotary_emb)(config=config).to(device)
    for layer in inner.layers:
        layer.to_empty(device=device)
        _init_(layer)
        if quantizer is not None:
            for name, linear in list(layer.named_modules()):
                if name.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(linear, nn.Linear):
                    parent, _, child = name.rpartition(".")
                    setattr(layer.get_submodule(parent), child, quantizer(linear))
                    del linear
    model.requires_grad_(False)
    return model


def flops_per_token(preset: str, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 N + 12 L d T (PaLM's MFU convention).

    N counts the weights that multiply activations (all projections and the LM head, not the
    embedding lookup); 12 L d T is the attention score and value products at sequence length T.
    """
    p = PRESETS[preset]
    d, f, layers, v = p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"], p["vocab_size"]
    kv = d * p["num_key_value_heads"] // p["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    n = layers * per_layer + v * d
    return 6.0 * n + 12.0 * layers * d * seq_len
