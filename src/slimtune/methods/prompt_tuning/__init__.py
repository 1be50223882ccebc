"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): learned
embeddings of n virtual tokens prepended to the input; the base model stays frozen."""

from __future__ import annotations

from torch import nn

from slimtune.methods.prompt_learning import StoredPrompt, fill_from_model, input_embeddings, virtual_tokens
from slimtune.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from slimtune.methods.prompt_tuning.encoder import PromptEmbedding
from slimtune.methods.spec import MethodSpec, PromptHooks

__all__ = ["METHOD", "PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]


def inject(model: nn.Module, config: PromptTuningConfig, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Nothing enters the base model; the config's shape fields are filled from it (and saved so)."""
    fill_from_model(config, model)


def build_encoder(model: nn.Module, config: PromptTuningConfig) -> nn.Module:
    if config.inference_mode:
        return StoredPrompt(config.total_virtual_tokens, config.token_dim)
    return PromptEmbedding(config, input_embeddings(model))


METHOD = MethodSpec(config_cls=PromptTuningConfig, inject=inject,
                    prompt=PromptHooks(build_encoder=build_encoder, forward=virtual_tokens.forward,
                                       generate=virtual_tokens.generate,
                                       backbone=virtual_tokens.backbone_forward))
