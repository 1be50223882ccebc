"""Token-summed causal-LM loss, so gradient accumulation can normalise by the whole step's tokens.

`token_loss(logits, labels)` returns the *sum* of next-token losses (fp32) and how many tokens had a
label. The loop divides every micro-batch's sum by the loss tokens of the whole accumulated step, so
grad_accum=4 x batch 1 gives the same gradient as one batch of 4 whatever the sequence lengths — the
model's own mean loss (per micro-batch) would weight short sequences' tokens more.
`hidden_token_loss` is the same sum from hidden states, without the logits (Note: the loss from hidden states).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.architectures import for_model_type
from slimtune.data.tokenize import IGNORE_INDEX


def token_loss(logits: torch.Tensor, labels: torch.Tensor,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of loss tokens).

    labels: (B, T) aligned with the inputs, IGNORE_INDEX where no loss; position t predicts labels[t + 1].
    logits: (B, T, V) for every position, or (B, K, V) for `positions` (K,) only (see loss_positions).
    The reduction runs in fp32 whatever the autocast dtype.
    """
    if positions is None:
        # Prompt tuning / p-tuning prepend virtual tokens: their logits come first and carry no label.
        logits = logits[:, logits.size(1) - labels.size(1) :]
        logits, targets = logits[:, :-1, :], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    else:
        targets = labels[:, positions.to(labels.device) + 1]  # (B, K)
    targets = targets.to(logits.device)
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """(K,) positions t whose next token labels[:, t + 1] carries loss in at least one row.

    # Note: logits only where there is loss
    Passed to the model as `logits_to_keep`, the (B, T, V) logits shrink to (B, K, V): prompt and padding
    positions cost no lm_head matmul and no fp32 copy (large vocabularies: ~1 GB per 2k-token row).
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def count_loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Positions of `labels` (B, T), unshifted, that contribute to the loss."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


# Note: the loss from hidden states
# With the fast path on (kernels/dispatch.py: auto on CUDA, on everywhere), a causal LM whose forward is
# `logits = lm_head(hidden[:, logits_to_keep])` with a plain bias-free nn.Linear head gets its loss from
# the backbone's last hidden state and the head weight through the chunked linear cross-entropy
# (kernels/cross_entropy.py): the (B, K, V) logits and their fp32 copy never exist, only `chunk` rows at
# a time. The model still runs its own forward (so DDP, hooks and PEFT wrappers see a normal call), with
# logits_to_keep = no position; a forward hook on the backbone hands over its output. The sum and the
# count are the ones token_loss computes from the logits, so the accumulation normalisation is unchanged.
# Which model types qualify: Architecture.plain_head (architectures.py).


def loss_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, lm_head) when the loss can come from hidden states (see Note: the loss from hidden states).

    None for prompt-learning methods (virtual tokens shift positions), heads that are adapted, biased or
    sharded (FSDP2 DTensor), model types without Architecture.plain_head, and whenever the fast path is off.
    """
    model = getattr(model, "module", model)  # DistributedDataParallel
    configs = getattr(model, "peft_config", None) or {}
    if any(getattr(c, "num_virtual_tokens", None) for c in configs.values()):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not for_model_type(getattr(getattr(base, "config", None), "model_type", None)).plain_head:
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if type(head) is not nn.Linear or head.bias is not None or not isinstance(backbone, nn.Module):
        return None
    if type(head.weight.data) is not torch.Tensor:  # a DTensor shard (FSDP2) is not the whole head
        return None
    from slimtune.kernels.dispatch import use_fused

    return (backbone, head) if use_fused(head.weight) else None


# Note: right padding needs no attention mask
# In a causal LM a token attends only to earlier positions, and with right padding every earlier position
# of a real token is real: its output is the same with the padding mask or without it. Only the pads'
# own outputs change, and they carry no label (IGNORE_INDEX), so neither the loss nor any gradient does.
# Without the 2D mask transformers hands SDPA is_causal=True instead of a dense (B, 1, T, T) mask, which
# on an H200 ran cuDNN's attention 3x faster (train/cuda_graphs.py, Note: transformers' masks under capture),
# and skips its all-ones check, a host sync per forward. `drop_right_padding_mask` does this only when
# it is exact and pays: rotary models whose positions do not come from the mask (Architecture.mask_free)
# running SDPA (flash-attention 2 uses the mask to skip the pads, so it keeps it), a 2D mask
# that is right padding row by row, no packed position_ids, and IGNORE_INDEX under every pad. The
# checks run on the collated CPU tensors before they move to the device.


def drop_right_padding_mask(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether the batch's attention_mask may be left out of a training forward (Note: right padding...)."""
    mask, labels = batch.get("attention_mask"), batch.get("labels")
    if mask is None or labels is None or mask.dim() != 2 or "position_ids" in batch or mask.is_cuda:
        return False
    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    config = getattr(base, "config", None)
    if not for_model_type(getattr(config, "model_type", None)).mask_free or \
            getattr(config, "_attn_implementation", None) != "sdpa":  # flash-attention unpads with the mask
        return False
    keep = mask.bool()
    right_padded = bool((keep[:, 1:] <= keep[:, :-1]).all())  # once 0, 0 to the end of the row
    return right_padded and bool((labels[~keep] == IGNORE_INDEX).all())


def hidden_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """token_loss(lm_head(hidden[:, positions]), labels, positions) without the logits.

    hidden: (B, T, C) backbone output (after the final norm); weight: (V, C) head weight; positions: (K,)
    from loss_positions. Under autocast both run in the autocast dtype, as the head's F.linear would.
    """
    from slimtune.kernels.cross_entropy import chunked_linear_cross_entropy

    positions = positions.to(hidden.device)
    h = hidden[:, positions].reshape(-1, hidden.size(-1))  # (B*K, C)
    targets = labels.to(hidden.device)[:, positions + 1].reshape(-1)  # (B*K,)
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else weight.dtype
    return chunked_linear_cross_entropy(h.to(dtype), weight.to(dtype), targets, IGNORE_INDEX)
