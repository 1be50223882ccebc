"""Per-row cross-entropy of a block of logits and its gradient, in torch: the reference of ce_rows.py.

Kept apart from ce_rows.py (Triton) so that cross_entropy.py and CPU runs use it without importing Triton.
"""

from __future__ import annotations

import torch

__all__ = ["ce_rows_reference"]


def ce_rows_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """Row losses (c,) fp32 of logits (c, V); with write_grad the logits become dloss/dlogits: fp32
    log-softmax, the gradient rounded once to logits' dtype. The reference of ce_rows.py, and what runs
    where Triton does not."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    valid = labels != ignore_index
    index = torch.where(valid, labels, 0).unsqueeze(1)
    loss = torch.where(valid, lse - z.gather(1, index).squeeze(1), 0.0)
    if write_grad:
        grad = torch.exp_(z.sub_(lse.unsqueeze(1)))  # softmax, in z's memory (logits' own when fp32)
        grad.scatter_add_(1, index, torch.full_like(index, -1, dtype=grad.dtype))
        grad.mul_(valid.unsqueeze(1))
        logits.copy_(grad)
    return loss
