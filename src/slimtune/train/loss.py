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


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of loss tokens).

    logits: (B, T, V) scores for the token after each position; labels: (B, T) aligned with the inputs,
    IGNORE_INDEX where no loss. Position t predicts labels[t + 1], so both are shifted by one.
    The reduction runs in fp32 whatever the autocast dtype.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(shift_logits.device)  # (B, T-1)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return total, count_loss_tokens(shift_labels, shifted=True)


def count_loss_tokens(labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Positions that contribute to the loss; `labels` (B, T) unshifted unless `shifted`."""
    labels = labels if shifted else labels[:, 1:]
    return (labels != IGNORE_INDEX).sum()
