"""What a method package gives the registry: `METHOD = MethodSpec(...)` in its `__init__.py`.

Layer methods (LoRA, IA3, AdaLoRA) replace target modules with wrappers that satisfy `AdapterLayer`
(adapter_layer.py); the rest of slimtune only talks to that protocol. Prompt-learning methods (prompt tuning,
prefix tuning, P-tuning) leave the base model alone and give `PromptHooks`: a trainable encoder that PeftModel
holds, and the forward/generate that feed its output to the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimtune.config import PeftConfig

__all__ = ["MethodSpec", "PromptHooks", "RunStateHooks"]


@dataclasses.dataclass(frozen=True)
class PromptHooks:
    """How a prompt-learning method reaches the model. `prompt` below is the encoder's output, (rows, dim)."""

    build_encoder: Callable[[nn.Module, PeftConfig], nn.Module]
    """build_encoder(base_model, config): the module whose forward() (no arguments) returns the prompt; for an
    inference-mode config, a frozen table of exactly the saved `prompt_embeddings` (peft's file format)."""
    forward: Callable[[nn.Module, torch.Tensor, PeftConfig, dict[str, Any]], Any]
    """forward(base_model, prompt, config, inputs): the base model's outputs with the prompt applied."""
    generate: Callable[[nn.Module, torch.Tensor, PeftConfig, dict[str, Any]], Any]
    """generate(base_model, prompt, config, generate_kwargs): base_model.generate's result with the prompt."""
    backbone: Callable[[nn.Module, torch.Tensor, PeftConfig, dict[str, Any]], Any]
    """backbone(backbone, prompt, config, inputs): the backbone's (e.g. LlamaModel's) outputs with the prompt
    applied, last_hidden_state at the real tokens only. `peft_model.base_model(...)` runs it: TRL's SFTTrainer
    computes its fused loss from those hidden states (see peft_model.AdaptedModel)."""


@dataclasses.dataclass(frozen=True)
class RunStateHooks:
    """A method's training state that lives outside its parameters: checkpoints carry it so resume is exact."""

    get: Callable[[nn.Module, PeftConfig, str], dict[str, torch.Tensor]]
    """get(model, config, adapter_name): the state as named tensors (never the parameters themselves)."""
    load: Callable[[nn.Module, PeftConfig, str, dict[str, torch.Tensor]], None]
    """load(model, config, adapter_name, tensors): restore what `get` returned; {} resets the state. Raises
    ValueError naming a key that fits no adapter of the model or a tensor of the wrong shape."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How one adapter method plugs in."""

    config_cls: type[PeftConfig]
    inject: Callable[[nn.Module, PeftConfig, str], None]
    """inject(model, config, adapter_name): add the adapter to `model` in place."""
    extra_trainable: Callable[[nn.Module, PeftConfig], Iterator[tuple[str, nn.Parameter]]] | None = None
    """Base parameters the config also trains and saves (e.g. LoRA's bias='all'), by state-dict name."""
    on_step: Callable[[nn.Module, PeftConfig, str, int], None] | None = None
    """on_step(model, config, adapter_name, global_step): called after each optimizer step (AdaLoRA's allocator)."""
    extra_loss: Callable[[nn.Module, PeftConfig, str], torch.Tensor] | None = None
    """A regularization term added to the model's loss in training (AdaLoRA's orthogonality penalty)."""
    prompt: PromptHooks | None = None
    """Set by prompt-learning methods (their `inject` only fills config fields from the model)."""
    to_file: Callable[[dict[str, torch.Tensor], PeftConfig, str], dict[str, torch.Tensor]] | None = None
    """to_file(tensors, config, adapter_name): the adapter file's tensors from the in-memory ones (PEFT file keys).
    Applied by save_pretrained only; state_dict() keeps the training shapes (AdaLoRA writes only its kept triplets)."""
    run_state: RunStateHooks | None = None
    """State outside the parameters that an exact resume needs (AdaLoRA's allocator averages and masks)."""
