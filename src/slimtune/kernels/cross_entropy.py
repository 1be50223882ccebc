"""Chunked LM-head cross-entropy: sum of token losses without the (N, V) fp32 logits.

    chunked_linear_cross_entropy(hidden (N, C), weight (V, C), labels (N,)) -> (loss_sum, n_tokens)

equals `cross_entropy_reference`: F.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum"),
the way transformers computes it (logits in the compute dtype, upcast to fp32), but only `chunk`
rows of logits exist at any time. For a 128k vocabulary the full fp32 logits of 8192 tokens are
4.2 GB (plus their bf16 copy and the gradient); chunked, 523 rows cost 134 MB in bf16, and the
gradient is taken in the same pass (Note: the gradient in the forward).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from slimtune.kernels.ce_rows_reference import ce_rows_reference
from slimtune.kernels.dispatch import use_triton

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
    L is a scalar and the last op of the step, so the forward computes the gradient for g = 1 at once,
    chunk by chunk (Note: the gradient in the forward), and backward only scales it by g.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                ignore_index: int, chunk: int, need_h: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows = _row_kernel(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk]  # (c, C)
                logits = h @ weight.T  # (c, V) in the compute dtype, as transformers' head gives them
                total += rows(logits, labels[start:start + chunk], ignore_index, need_h or need_w).sum()
                # logits now hold dL/dz of the chunk (for g = 1)
                if need_h:
                    torch.mm(logits, weight, out=grad_h[start:start + chunk])
                if need_w:
                    grad_w += (logits.T @ h).float()
                del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        n_tokens = (labels != ignore_index).sum()
        ctx.mark_non_differentiable(n_tokens)
        return total, n_tokens

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, _grad_n: Any) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


# Note: the gradient in the forward
# The loss is a sum over tokens and nothing follows it but a scale (1 / tokens, the loss scaler), so
# dL/dz of a chunk is known as soon as its logits are: softmax(z) - onehot(label). The forward writes it
# over the chunk's logits (kernels/ce_rows.py: one read for the row max and sum, one read + write for
# the gradient) and multiplies it into dH = (dL/dz) W right away. Against recomputing the logits in
# backward this saves one (c, C) @ (C, V) matmul per chunk (a third of the head's FLOPs), the fp32 copy
# of the logits, and a log_softmax and a softmax pass; what stays alive until backward is dH (N, C), the
# size of the hidden states that were kept before. Rounding: dL/dz is rounded to the compute dtype before
# the matmul, and g multiplies dH afterwards (before: (P - Y) g rounded, then the matmul).


def _row_kernel(hidden: torch.Tensor) -> Any:
    """ce_rows_ (Triton on CUDA), or the torch reference where Triton does not run."""
    if use_triton(hidden):
        from slimtune.kernels.ce_rows import ce_rows_

        return ce_rows_
    return ce_rows_reference


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
    grad = torch.is_grad_enabled()
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk,
                                            grad and hidden.requires_grad, grad and weight.requires_grad)
