"""Virtual tokens in front of the input embeddings: the forward and generation of prompt tuning and P-tuning.

The learned prompt (n, D) is expanded over the batch and concatenated before the token embeddings; the
attention mask gets n ones in front, labels n -100s (virtual tokens are never predicted), position ids
0..n-1 in front of the given ones shifted by n, token_type_ids n zeros.

# Note: virtual tokens and left padding
For a causal LM, generation derives position ids from the attention mask (cumsum), so with the mask
[1]*n + [0, 0, 1, 1] the real tokens get positions n, n+1, ... whatever the padding: a left-padded row
generates exactly what it generates alone. An encoder (T5) has no position ids: its relative position bias
counts slots, so [virtual, pad, pad, real] would put the pads between the prompt and the text. For
encoder-decoder models the virtual tokens therefore go right before the first real token of each row
([pad, pad, virtual, real]); on an unpadded batch this is peft's layout exactly.

# Note: TRL's fused loss
TRL's SFTTrainer computes its loss from `model.base_model(...)` hidden states against the labels it holds
(unextended, length T), so `backbone_forward` returns the real tokens' hidden states only. The prediction of
the first real token from the last virtual one therefore falls out of that loss; forward() (labels extended
with n -100s, as peft) scores it. peft under TRL also scores it: one token per row is the only difference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.methods.prompt_learning.config import PromptLearningConfig, input_embeddings


def _ones(batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(batch, n, dtype=like.dtype, device=like.device)


def _embed(model: nn.Module, prompt: torch.Tensor, config: PromptLearningConfig,
           inputs: dict[str, Any]) -> torch.Tensor:
    """Pop input_ids/inputs_embeds from inputs and return [virtual, tokens] embeddings, (B, n + T, D)."""
    input_ids, embeds = inputs.pop("input_ids", None), inputs.pop("inputs_embeds", None)
    if embeds is None:
        if input_ids is None:
            raise ValueError("prompt learning needs input_ids or inputs_embeds; got neither")
        embeds = input_embeddings(model)(input_ids)
    n = config.num_virtual_tokens
    virtual = prompt[:n].to(device=embeds.device, dtype=embeds.dtype)  # encoder-decoder: the encoder's share
    return torch.cat([virtual.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds], dim=1)


def _extend(inputs: dict[str, Any], n: int, batch: int, causal: bool) -> None:
    """Mask, labels, position and token type ids grow by the n virtual positions in front."""
    if (mask := inputs.get("attention_mask")) is not None:
        inputs["attention_mask"] = torch.cat([_ones(batch, n, mask), mask], dim=1)
    if (token_types := inputs.get("token_type_ids")) is not None:
        inputs["token_type_ids"] = torch.cat([torch.zeros_like(token_types[:, :1]).expand(-1, n), token_types], 1)
    if not causal:
        return
    if (labels := inputs.get("labels")) is not None:
        inputs["labels"] = torch.cat([torch.full_like(labels[:, :1], -100).expand(-1, n), labels], dim=1)
    if (positions := inputs.get("position_ids")) is not None:
        front = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], -1)
        inputs["position_ids"] = torch.cat([front, positions + n], dim=1)


def _pads_first(embeds: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Move padding slots in front of the virtual tokens (see Note: virtual tokens and left padding)."""
    if mask is None or bool(mask.all()):
        return embeds, mask
    order = torch.sort((mask != 0).to(torch.int8), dim=1, stable=True).indices  # (B, n + T): pads, then the rest
    embeds = torch.gather(embeds, 1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    return embeds, torch.gather(mask, 1, order)


def _prepare(model: nn.Module, prompt: torch.Tensor, config: PromptLearningConfig,
             inputs: dict[str, Any]) -> dict[str, Any]:
    inputs = dict(inputs)
    embeds = _embed(model, prompt, config, inputs)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    _extend(inputs, config.num_virtual_tokens, embeds.shape[0], causal=not encoder_decoder)
    if encoder_decoder:
        embeds, inputs["attention_mask"] = _pads_first(embeds, inputs.get("attention_mask"))
        if inputs["attention_mask"] is None:
            del inputs["attention_mask"]
    inputs["inputs_embeds"] = embeds
    return inputs


def forward(model: nn.Module, prompt: torch.Tensor, config: PromptLearningConfig, inputs: dict[str, Any]) -> Any:
    """The model's forward with the virtual tokens in front; logits cover virtual positions too (as in peft)."""
    return model(**_prepare(model, prompt, config, inputs))


def backbone_forward(backbone: nn.Module, prompt: torch.Tensor, config: PromptLearningConfig,
                     inputs: dict[str, Any]) -> Any:
    """The backbone (no head) with the virtual tokens in front. A decoder-only model's last_hidden_state keeps the
    real tokens only, (B, T, D), so it lines up with the labels (TRL's fused loss reads it); an encoder-decoder
    model's is the decoder's, which has no virtual tokens."""
    outputs = backbone(**_prepare(backbone, prompt, config, inputs))
    if not getattr(getattr(backbone, "config", None), "is_encoder_decoder", False):
        outputs.last_hidden_state = outputs.last_hidden_state[:, config.num_virtual_tokens:]
    return outputs


def generate(model: nn.Module, prompt: torch.Tensor, config: PromptLearningConfig, inputs: dict[str, Any]) -> Any:
    """model.generate from [virtual, tokens] embeddings. Decoder-only output is input_ids + new tokens, as in peft."""
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("generate with a prompt-learning adapter needs input_ids")
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    inputs = dict(inputs)
    if inputs.get("attention_mask") is None and not encoder_decoder:
        inputs["attention_mask"] = torch.ones_like(input_ids)
    inputs.pop("encoder_outputs", None)  # the encoder must see the virtual tokens
    prepared = _prepare(model, prompt, config, inputs)
    prepared.pop("position_ids", None)  # generate derives them from the mask
    outputs = model.generate(**prepared)
    if encoder_decoder:
        return outputs
    return _prepend(input_ids, outputs)


def _prepend(input_ids: torch.Tensor, outputs: Any) -> Any:
    """Decoder-only generate from inputs_embeds returns only new tokens; put the prompt ids back in front."""
    if isinstance(outputs, torch.Tensor):
        return torch.cat([input_ids.to(outputs.device), outputs], dim=1)
    outputs.sequences = torch.cat([input_ids.to(outputs.sequences.device), outputs.sequences], dim=1)
    return outputs
