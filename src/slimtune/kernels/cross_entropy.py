"""Chunked LM-head cross-entropy: sum of token losses without the (N, V) fp32 logits.

    chunked_linear_cross_entropy(hidden (N, C), weight (V, C), labels (N,)) -> (loss_sum, n_tokens)

equals `cross_entropy_reference`: F.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum"),
the way transformers computes it (logits in the compute dtype, upcast to fp32), but only `chunk`
rows of logits exist at any time. For a 128k vocabulary the full fp32 logits of 8192 tokens are
4.2 GB (plus their bf16 copy and the gradient); chunked, 512 rows cost 0.4 GB.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["chunked_linear_cross_entropy", "cross_entropy_reference", "default_chunk"]


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk: about 2**26 logits (256 MB in fp32), at least 16 rows."""
    return max(16, (1 << 26) // max(1, vocab_size))


def cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain computation: full (N, V) logits, upcast, summed cross-entropy; (loss_sum, n_tokens)."""
    logits = (hidden @ weight.T).float()  # (N, V)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """L = sum_i [labels_i != ignore] (logsumexp(z_i) - z_i[labels_i]),  z = H W^T  (N, V), in fp32.

    With P = softmax(z) row-wise and Y the one-hot labels (zero rows where ignored):
        dL/dz = g (P - Y) * valid            g = the incoming gradient of L (a scalar)
        dH = (dL/dz) W       (N, V) @ (V, C)
        dW = (dL/dz)^T H     (V, N) @ (N, C)
    Forward keeps only H, W and the labels; backward recomputes z chunk by chunk (one more
    H W^T matmul: ~1/3 of the head's cost) instead of storing N x V probabilities.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                ignore_index: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start:start + chunk] @ weight.T).float()  # (c, V)
            target = labels[start:start + chunk]
            total += F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
            del logits
        ctx.save_for_backward(hidden, weight, labels)
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        n_tokens = (labels != ignore_index).sum()
        ctx.mark_non_differentiable(n_tokens)
        return total, n_tokens

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, _grad_n: Any) -> tuple[Any, ...]:
        hidden, weight, labels = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start:start + ctx.chunk]  # (c, C)
            target = labels[start:start + ctx.chunk]
            valid = target != ctx.ignore_index
            grad_z = torch.softmax((h @ weight.T).float(), dim=-1)  # (c, V) fp32: P
            rows = torch.arange(target.shape[0], device=target.device)
            grad_z[rows, target.clamp(min=0)] -= 1.0  # P - Y
            grad_z *= (valid.float() * grad_total).unsqueeze(1)
            grad_z = grad_z.to(hidden.dtype)
            if need_h:
                grad_h[start:start + ctx.chunk] = grad_z @ weight
            if need_w:
                grad_w += (grad_z.T @ h).float()
            del grad_z
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 ignore_index: int = -100, chunk: int | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies (fp32 scalar), number of labelled tokens), never all logits at once.

    Args:
        hidden: (N, C) final hidden states (after the last norm), already shifted to predict `labels`.
        weight: (V, C) output head weight (lm_head.weight), same dtype as `hidden`.
        labels: (N,) int64 target ids, `ignore_index` where no loss.
        chunk: rows of logits per step; default `default_chunk(V)`.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_linear_cross_entropy: hidden {tuple(hidden.shape)} must be (N, C) and "
                         f"weight {tuple(weight.shape)} (V, C) with the same C")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_linear_cross_entropy: labels {tuple(labels.shape)} must be ({hidden.shape[0]},)")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"chunked_linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    chunk = chunk or default_chunk(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunked_linear_cross_entropy: chunk must be >= 1, got {chunk}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk)
