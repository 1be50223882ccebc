"""One batch through the model: the token-loss sum and count, for training, graph capture and evaluation.

    loss_sum, n = forward_loss(model, batch, device, supports_logits_to_keep(model))

The loss is a sum over loss tokens (the caller divides by the step's loss-token count, see
slimtune.train.loss). Where the loss can come from hidden states (loss.loss_head), no logits are kept
at all: `hidden_forward_loss` runs the model's own forward with zero logits and feeds the backbone's
output to the chunked cross-entropy. The Trainer (loop.py), the CUDA-graph steps (cuda_graphs.py) and
evaluation all call these functions; this module imports neither of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from slimtune.train.device import model_device
from slimtune.train.loss import (
    drop_right_padding_mask,
    hidden_token_loss,
    loss_head,
    loss_positions,
    token_loss,
)

__all__ = ["Batch", "MODEL_INPUTS", "Row", "evaluation_loss", "forward_loss", "hidden_forward_loss",
           "supports_logits_to_keep"]

Row = dict[str, list[int]]
Batch = dict[str, torch.Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


@torch.no_grad()
def evaluation_loss(model: nn.Module, rows: Sequence[Row], collate: Callable[[list[Row]], Batch], batch_size: int,
                    amp_dtype: torch.dtype | None = None, logits_to_keep: bool | None = None) -> tuple[float, int]:
    """(mean next-token loss over every loss token of `rows`, number of loss tokens); model left in eval()."""
    model.eval()
    device = model_device(model)
    keep = supports_logits_to_keep(model) if logits_to_keep is None else logits_to_keep
    loss_sum, n_tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate(list(rows[i : i + batch_size]))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            s, n = forward_loss(model, batch, device, keep)
        loss_sum, n_tokens = loss_sum + s.item(), n_tokens + int(n)
    return loss_sum / max(1, n_tokens), n_tokens


def forward_loss(model: nn.Module, batch: Batch, device: torch.device,
                 logits_to_keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, loss tokens) of one batch; logits only at loss positions if supported,
    none at all where the loss comes from hidden states (loss.loss_head)."""
    inputs: dict[str, Any] = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    positions = loss_positions(batch["labels"]) if logits_to_keep else None
    head = loss_head(model) if positions is not None else None
    if head is not None:
        if drop_right_padding_mask(model, batch):  # exact for the loss: Note: right padding needs no attention mask
            inputs.pop("attention_mask")
        return hidden_forward_loss(model, head, inputs, batch["labels"], positions.to(device))
    if positions is not None:
        inputs["logits_to_keep"] = positions.to(device)
    return token_loss(model(**inputs, use_cache=False).logits, batch["labels"], positions)


def hidden_forward_loss(model: nn.Module, head: tuple[nn.Module, nn.Linear], inputs: dict[str, Any],
                         labels: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own forward with no logits kept; the backbone's output goes to hidden_token_loss."""
    backbone, lm_head = head
    seen: list[torch.Tensor] = []
    handle = backbone.register_forward_hook(lambda _m, _a, out: seen.append(out[0]))
    try:
        model(**inputs, logits_to_keep=positions[:0], use_cache=False)  # (B, 0, V) logits
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"the backbone {type(backbone).__name__} ran {len(seen)} times in one forward")
    return hidden_token_loss(seen[0], lm_head.weight, labels, positions)


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (wrapped) transformers model accepts `logits_to_keep` (see loss.loss_positions)."""
    configs = getattr(model, "peft_config", None) or {}
    if any(getattr(c, "num_virtual_tokens", None) for c in configs.values()):
        return False  # virtual tokens shift every position
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters
