"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual token embeddings produced by a small MLP or
LSTM encoder and prepended to the input; only the encoder trains, only its output is saved."""

from __future__ import annotations

from torch import nn

from slimtune.methods.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from slimtune.methods.p_tuning.encoder import PromptEncoder
from slimtune.methods.prompt_learning import StoredPrompt, fill_from_model, virtual_tokens
from slimtune.methods.spec import MethodSpec, PromptHooks

__all__ = ["METHOD", "PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]


def inject(model: nn.Module, config: PromptEncoderConfig, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Nothing enters the base model; the config's shape fields are filled from it (and saved so)."""
    fill_from_model(config, model)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim


def build_encoder(model: nn.Module, config: PromptEncoderConfig) -> nn.Module:
    if config.inference_mode:
        return StoredPrompt(config.total_virtual_tokens, config.token_dim)
    return PromptEncoder(config)


METHOD = MethodSpec(config_cls=PromptEncoderConfig, inject=inject,
                    prompt=PromptHooks(build_encoder=build_encoder, forward=virtual_tokens.forward,
                                       generate=virtual_tokens.generate,
                                       backbone=virtual_tokens.backbone_forward))
