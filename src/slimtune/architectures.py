"""What slimtune knows about each model architecture, in one table keyed by `config.model_type`.

    for_model_type(model_type) -> the Architecture of that model type (a blank one when it is not listed)
    column(field)              -> {model_type: value} for the architectures that set `field`

Where peft 0.21 has a default for a model type (its TRANSFORMERS_MODELS_TO_*_MODULES_MAPPING tables), the
target list is peft's, in peft's order, so a config without target_modules adapts the same modules here and
in peft; the other lists (e.g. LoRA on phi3, whose attention has one fused qkv_proj, and AdaLoRA on
mistral) are slimtune's own. peft's one regex default (LoRA on gemma4's language model) is not listed:
name the targets there.
This module imports nothing from slimtune: every other module may read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Architecture", "ARCHITECTURES", "for_model_type", "column"]

Names = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One model type's entry. A None target list means "no default": the method then needs the names."""

    lora_targets: Names | None = None
    """LoRA's (and DoRA's, QLoRA's) target_modules when the config gives none."""
    ia3_targets: Names | None = None
    """IA3's target_modules when the config gives none."""
    ia3_feedforward: Names | None = None
    """IA3's feedforward_modules when the config gives none: the targets whose input, not output, is
    scaled. () is a default too: no target is a feedforward one."""
    adalora_targets: Names | None = None
    """AdaLoRA's target_modules when the config gives none."""
    plain_head: bool = False
    """The causal LM's logits are exactly lm_head(hidden) (no soft-capping or logit scale), so the loss may
    come from the backbone's last hidden state (train/loss.py, Note: the loss from hidden states)."""
    mask_free: bool = False
    """Attention is causal with rotary positions from position_ids (not the mask), so a right-padded
    training batch may leave its attention mask out (train/loss.py, Note: right padding needs no attention
    mask)."""
    fused_prefix: str | None = None
    """The class-name prefix of transformers' <prefix>RMSNorm, <prefix>Attention and <prefix>MLP when
    they are Llama's line for line, so kernels/llama_fused.py may run its fused forwards in them; None: it
    does not."""
    gguf_export: bool = False
    """infer/gguf_export.py writes this architecture (as llama.cpp's "llama")."""


_QV = ("q_proj", "v_proj")
_QKV = ("query_key_value",)
_QUERY_VALUE = ("query", "value")
_DOWN = ("down_proj",)
_QV_DOWN = ("q_proj", "v_proj", "down_proj")
_KV_DOWN = ("k_proj", "v_proj", "down_proj")
_FALCON_IA3 = dict(ia3_targets=("query_key_value", "dense_4h_to_h"), ia3_feedforward=("dense_4h_to_h",))
_ENCODER_IA3 = dict(ia3_targets=("key", "value", "output.dense"), ia3_feedforward=("output.dense",))
_GPT2_IA3 = dict(ia3_targets=("c_attn", "mlp.c_proj"), ia3_feedforward=("mlp.c_proj",))
_BART_ADALORA = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

ARCHITECTURES: dict[str, Architecture] = {
    # decoder-only language models
    "llama": Architecture(lora_targets=_QV, ia3_targets=_KV_DOWN, ia3_feedforward=_DOWN, adalora_targets=_QV,
                          plain_head=True, mask_free=True, fused_prefix="Llama", gguf_export=True),
    "llama4": Architecture(lora_targets=_QV, ia3_targets=_QV_DOWN, ia3_feedforward=_DOWN, adalora_targets=_QV),
    "mistral": Architecture(lora_targets=_QV, ia3_targets=_KV_DOWN, ia3_feedforward=_DOWN,
                            adalora_targets=_QV, plain_head=True, mask_free=True, fused_prefix="Mistral"),
    "mixtral": Architecture(lora_targets=_QV, ia3_targets=("k_proj", "v_proj", "w2"), ia3_feedforward=("w2",),
                            plain_head=True),
    "qwen2": Architecture(lora_targets=_QV, ia3_targets=_QV_DOWN, ia3_feedforward=_DOWN, adalora_targets=_QV,
                          plain_head=True, mask_free=True, fused_prefix="Qwen2"),
    "qwen2_moe": Architecture(lora_targets=_QV, plain_head=True),
    "qwen3": Architecture(lora_targets=_QV, ia3_targets=_QV_DOWN, ia3_feedforward=_DOWN, adalora_targets=_QV,
                          plain_head=True, mask_free=True),
    "gemma": Architecture(lora_targets=_QV, ia3_targets=_QV_DOWN, ia3_feedforward=_DOWN, adalora_targets=_QV,
                          plain_head=True, mask_free=True),
    "gemma2": Architecture(lora_targets=_QV, ia3_targets=_QV_DOWN, ia3_feedforward=_DOWN,
                           adalora_targets=_QV),
    "gemma3_text": Architecture(lora_targets=_QV, ia3_targets=_QV_DOWN, ia3_feedforward=_DOWN, adalora_targets=_QV),
    "phi": Architecture(lora_targets=("q_proj", "v_proj", "fc1", "fc2"), ia3_targets=("q_proj", "v_proj", "fc2"),
                        ia3_feedforward=("fc2",)),
    "phi3": Architecture(lora_targets=("qkv_proj",), plain_head=True, mask_free=True),
    "olmo": Architecture(lora_targets=_QV, plain_head=True, mask_free=True),
    "olmo2": Architecture(plain_head=True, mask_free=True),
    "smollm3": Architecture(plain_head=True, mask_free=True),
    "starcoder2": Architecture(lora_targets=_QV, plain_head=True),
    "stablelm": Architecture(lora_targets=_QV),
    "nemotron_h": Architecture(lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                               adalora_targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "mpt": Architecture(lora_targets=("Wqkv",)),
    "codegen": Architecture(lora_targets=("qkv_proj",)),
    "btlm": Architecture(lora_targets=("c_proj", "c_attn")),
    "rwkv": Architecture(lora_targets=("key", "value", "receptance", "output")),
    "rwkv7": Architecture(lora_targets=("r_proj", "k_proj", "v_proj", "o_proj", "key", "value")),
    "opt": Architecture(lora_targets=_QV, ia3_targets=("q_proj", "k_proj", "fc2"), ia3_feedforward=("fc2",),
                        adalora_targets=_BART_ADALORA),
    "gptj": Architecture(lora_targets=_QV, ia3_targets=("q_proj", "v_proj", "fc_out"),
                         ia3_feedforward=("fc_out",), adalora_targets=_QV),
    "gpt_neo": Architecture(lora_targets=_QV, ia3_targets=("q_proj", "v_proj", "c_proj"), ia3_feedforward=("c_proj",),
                            adalora_targets=_QV),
    "gpt_neox": Architecture(lora_targets=_QKV, adalora_targets=_QKV, **_FALCON_IA3),
    "gpt2": Architecture(lora_targets=("c_attn",), adalora_targets=("c_attn",), plain_head=True, **_GPT2_IA3),
    "gpt_bigcode": Architecture(lora_targets=("c_attn",), adalora_targets=("c_attn",), **_GPT2_IA3),
    "bloom": Architecture(lora_targets=_QKV, ia3_targets=("query_key_value", "mlp.dense_4h_to_h"),
                          ia3_feedforward=("mlp.dense_4h_to_h",), adalora_targets=_QKV, plain_head=True),
    "falcon": Architecture(lora_targets=_QKV, **_FALCON_IA3),
    # Falcon's model_type in checkpoints that predate its transformers class (remote code)
    "RefinedWeb": Architecture(lora_targets=_QKV, **_FALCON_IA3),
    "RefinedWebModel": Architecture(lora_targets=_QKV, **_FALCON_IA3),
    "chatglm": Architecture(lora_targets=_QKV),
    "glm": Architecture(lora_targets=_QV),
    # encoder-decoder and vision-language models
    "blip-2": Architecture(lora_targets=("q", "v", "q_proj", "v_proj")),
    "t5": Architecture(lora_targets=("q", "v"), ia3_targets=("k", "v", "wo"), ia3_feedforward=("wo",),
                       adalora_targets=("q", "k", "v", "o", "wi", "wo")),
    "mt5": Architecture(lora_targets=("q", "v"), ia3_targets=("k", "v", "wi_1"), ia3_feedforward=(),
                        adalora_targets=("q", "k", "v", "o", "wi_0", "wi_1", "wo")),
    "umt5": Architecture(lora_targets=("q", "v")),
    "bart": Architecture(lora_targets=_QV, ia3_targets=("q_proj", "v_proj", "fc2"), ia3_feedforward=("fc2",),
                         adalora_targets=_BART_ADALORA),
    "mbart": Architecture(lora_targets=_QV),
    # encoders
    "bert": Architecture(lora_targets=_QUERY_VALUE, adalora_targets=_QUERY_VALUE, **_ENCODER_IA3),
    "roberta": Architecture(lora_targets=_QUERY_VALUE, adalora_targets=("query", "key", "value", "dense"),
                            **_ENCODER_IA3),
    "xlm-roberta": Architecture(lora_targets=_QUERY_VALUE),
    "electra": Architecture(lora_targets=_QUERY_VALUE),
    "layoutlm": Architecture(lora_targets=_QUERY_VALUE),
    "deberta-v2": Architecture(lora_targets=("query_proj", "value_proj"),
                               ia3_targets=("key_proj", "value_proj", "output.dense"),
                               ia3_feedforward=("output.dense",),
                               adalora_targets=("query_proj", "key_proj", "value_proj", "dense")),
    "deberta": Architecture(lora_targets=("in_proj",), ia3_targets=("in_proj", "output.dense"), ia3_feedforward=("output.dense",),
                            adalora_targets=("in_proj",)),
}

_UNLISTED = Architecture()
_FIELDS = frozenset(f.name for f in dataclasses.fields(Architecture))


def for_model_type(model_type: object) -> Architecture:
    """The table's entry for `model_type` (a config's model_type, possibly None); for a model type the
    table does not list, an Architecture with no defaults and every flag off."""
    return ARCHITECTURES.get(model_type, _UNLISTED) if isinstance(model_type, str) else _UNLISTED


def column(field: str) -> dict[str, Any]:
    """{model_type: value of `field`} for the architectures that set it (not None, not False), in the
    table's order."""
    if field not in _FIELDS:
        raise ValueError(f"Architecture has no field {field!r}; fields: {', '.join(sorted(_FIELDS))}")
    values = {model_type: getattr(arch, field) for model_type, arch in ARCHITECTURES.items()}
    return {model_type: v for model_type, v in values.items() if v is not None and v is not False}
