"""Triton: per-row cross-entropy of a block of logits, and its gradient written over the logits.

    ce_rows_(logits (c, V), labels (c,), ignore_index, write_grad) -> loss (c,) fp32

For each row i with z = logits[i] (read in fp32): loss_i = logsumexp(z) - z[label_i], 0 where the label is
ignore_index. With write_grad the row is then overwritten, in logits' dtype, by dloss_i/dz =
softmax(z) - onehot(label_i) (zeros for ignored rows). Reference: `ce_rows_reference` (ce_rows_reference.py,
torch, fp32), which is also what CPU tensors run. One program per row, two passes over it: an online max / sum of
exponentials, then the gradient. The (c, V) logits are never copied to fp32: transformers upcasts the
bf16 logits before its loss, and so does the reference here, so reading bf16 and computing in fp32
gives the same numbers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtune.kernels.ce_rows_reference import ce_rows_reference

__all__ = ["ce_rows_"]


@triton.jit
def _ce_rows_kernel(z_ptr, labels_ptr, loss_ptr, V, stride, ignore_index, WRITE_GRAD: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    ptr = z_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), -3.0e38, tl.float32)  # finite: exp(m - m_new) never meets -inf - -inf
    s = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        z = tl.load(ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    row_max = tl.max(m, axis=0)
    lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), axis=0))
    label = tl.load(labels_ptr + row)
    valid = (label != ignore_index) & (label >= 0) & (label < V)
    z_label = tl.load(ptr + label, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_label, 0.0))
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            z = tl.load(ptr + idx, mask=idx < V, other=0.0).to(tl.float32)
            p = tl.exp(z - lse) - tl.where(idx == label, 1.0, 0.0)
            p = tl.where(valid, p, 0.0)
            tl.store(ptr + idx, p.to(z_ptr.dtype.element_ty), mask=idx < V)


def ce_rows_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, write_grad: bool,
             kernel: bool | None = None) -> torch.Tensor:
    """Row losses (c,) fp32 of logits (c, V) [last dim contiguous]; with write_grad, logits become the gradient.

    kernel: run the Triton kernel (default: on CUDA tensors; True on CPU needs TRITON_INTERPRET=1), else
    `ce_rows_reference`."""
    if not (logits.is_cuda if kernel is None else kernel):
        return ce_rows_reference(logits, labels, ignore_index, write_grad)
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        _ce_rows_kernel[(c,)](logits, labels, loss, v, logits.stride(0), ignore_index, WRITE_GRAD=write_grad,
                              BLOCK_V=4096, num_warps=8)
    return loss
