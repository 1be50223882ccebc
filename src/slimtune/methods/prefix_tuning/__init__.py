"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"): learned
keys/values for n virtual positions in every attention layer, fed as a pre-filled transformers Cache."""

from __future__ import annotations

from torch import nn

from slimtune.config import TaskType
from slimtune.methods.prefix_tuning.config import PrefixTuningConfig
from slimtune.methods.prefix_tuning.encoder import PrefixEncoder
from slimtune.methods.prompt_learning import StoredPrompt, fill_from_model, prefix_cache
from slimtune.methods.spec import MethodSpec, PromptHooks

__all__ = ["METHOD", "PrefixEncoder", "PrefixTuningConfig"]

SUPPORTED_TASKS = (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM)


def _key_value_heads(config: PrefixTuningConfig, model: nn.Module) -> None:
    """Grouped-query attention caches fewer heads: size the prefix for key/value heads (peft's rule)."""
    model_config = getattr(model, "config", None)
    kv_heads = getattr(model_config, "num_key_value_heads", None)
    if kv_heads is None:
        return
    head_dim = getattr(model_config, "head_dim", None) or config.token_dim // config.num_attention_heads
    config.token_dim, config.num_attention_heads = head_dim * kv_heads, kv_heads


def inject(model: nn.Module, config: PrefixTuningConfig, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Nothing enters the base model; the config's shape fields are filled from it (and saved so)."""
    if config.task_type is not None and config.task_type not in SUPPORTED_TASKS:
        raise ValueError(f"prefix tuning: task_type={config.task_type.value!r} is not supported; allowed: "
                         f"{', '.join(t.value for t in SUPPORTED_TASKS)} (prompt tuning also supports SEQ_CLS)")
    fill_from_model(config, model)
    _key_value_heads(config, model)
    if config.token_dim % config.num_attention_heads:
        raise ValueError(f"prefix tuning: token_dim={config.token_dim} is not a multiple of "
                         f"num_attention_heads={config.num_attention_heads}")
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim


def build_encoder(model: nn.Module, config: PrefixTuningConfig) -> nn.Module:
    if config.inference_mode:
        return StoredPrompt(config.num_virtual_tokens, config.num_layers * 2 * config.token_dim)
    return PrefixEncoder(config)


METHOD = MethodSpec(config_cls=PrefixTuningConfig, inject=inject,
                    prompt=PromptHooks(build_encoder=build_encoder, forward=prefix_cache.forward,
                                       generate=prefix_cache.generate,
                                       backbone=prefix_cache.forward))
