"""Token-summed causal-LM loss, so gradient accumulation can normalise by the whole step's tokens.

`token_loss(logits, labels)` returns the *sum* of next-token losses (fp32) and how many tokens had a
label. The loop divides every micro-batch's sum by the loss tokens of the whole accumulated step, so
grad_accum=4 x batch 1 gives the same gradient as one batch of 4 whatever the sequence lengths — the
model's own mean loss (per micro-batch) would weight short sequences' tokens more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt, padding, packing boundaries)."""


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
