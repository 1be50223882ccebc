"""prepare_model_for_kbit_training: freeze a (4-bit or plain) model and set it up for adapter training.

Three effects, each checked in tests/quant/test_kbit.py:
  1. every parameter is frozen (adapters added afterwards are the only trainable weights);
  2. gradient checkpointing is switched on, non-reentrant (the reentrant variant needs inputs
     that require grad and breaks with frozen embeddings);
  3. the input embeddings' output requires grad, so checkpointed blocks still see a graph even
     when nothing before them is trainable.

Note: no upcasting
peft's function of the same name also casts every fp16/bf16 parameter that is not 4-bit (norms,
embeddings, lm_head) to fp32. On an 8B model that is ~2 GB of extra memory for tensors that stay
frozen, so we leave dtypes alone: frozen weights in the compute dtype, only the trainable adapter
weights in fp32 (the trainer keeps fp32 master weights for them).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["prepare_model_for_kbit_training"]


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Freeze all parameters, enable non-reentrant gradient checkpointing and input grads. Returns `model`.

    Args:
        model: a transformers PreTrainedModel (4-bit from `load_model` or a plain one).
        use_gradient_checkpointing: recompute activations in backward (saves memory, ~30% slower).
        gradient_checkpointing_kwargs: passed to `model.gradient_checkpointing_enable`; defaults to
            {"use_reentrant": False}; a given dict without "use_reentrant" gets False added.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if not use_gradient_checkpointing:
        return model
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise TypeError(
            f"use_gradient_checkpointing=True needs a transformers PreTrainedModel; got {type(model).__name__}"
        )
    kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # the KV cache is useless (and warned about) under checkpointing
    return model
