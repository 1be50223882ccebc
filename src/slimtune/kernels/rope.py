"""Triton rotary position embedding for q and k in one launch, with a hand-written backward.

    apply_rope(q, k, cos, sin, unsqueeze_dim=1, inplace=False) -> (q_embed, k_embed)

equals `rope_reference`, transformers' apply_rotary_pos_emb (Llama, Qwen2, Mistral):
q * cos + rotate_half(q) * sin, where rotate_half(x) = cat(-x2, x1) on the two halves of the head
dim. Eager runs that as ~10 kernels (two slices, a neg, a cat, three muls and an add, for q and for
k), each rounding to bf16; here one program per (batch, position) row loads cos and sin once,
rotates every head of q and of k in fp32 and rounds once.

Shapes: with unsqueeze_dim=1 (transformers' default) q is (B, Hq, T, D) and k (B, Hk, T, D); with
unsqueeze_dim=2 they are (B, T, H, D), the layout a projection's output has before `.transpose(1, 2)`,
which is where the fused attention (llama_fused.py) calls it. cos, sin: (B or 1, T, D).
Any strides, as long as the head dim is contiguous; inplace=True overwrites q and k.

# Note: the backward is a rotation by -theta
Per position and frequency, with halves x = (x1, x2) and c = (c1, c2), s = (s1, s2):
    y1 = x1 c1 - x2 s1        y2 = x2 c2 + x1 s2
so the transpose of that linear map gives
    dx1 = g1 c1 + g2 s2       dx2 = g2 c2 - g1 s1
which for transformers' cos/sin (both halves equal) is the same rotation with sin negated. The
kernel uses the general form, so any cos/sin is exact. cos and sin get no gradient (they come from
the frozen rotary buffers); `apply_rope` refuses ones that require it.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["apply_rope", "rope_reference"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb, as it writes it."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (_rotate_half(q) * sin)
    k_embed = (k * cos) + (_rotate_half(k) * sin)
    return q_embed, k_embed


@triton.jit
def _rotate_heads(x_ptr, y_ptr, sx_h, sy_h, n_heads, c1, c2, s1, s2, d, dmask, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    """Rotate the n_heads heads of one row: x_ptr/y_ptr point at head 0, element 0 of the row."""
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & dmask[None, :]
        xo = h[:, None].to(tl.int64) * sx_h + d[None, :]  # (BLOCK_H, HALF_PAD) first-half offsets
        yo = h[:, None].to(tl.int64) * sy_h + d[None, :]
        x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + xo + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # see Note: the backward is a rotation by -theta
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(y_ptr + yo, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + yo + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, n_pos, hq, hk,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sqo_b, sqo_t, sqo_h, sko_b, sko_t, sko_h, sc_b, sc_t,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    """One program per (b, t): cos/sin halves loaded once, then every head of q and of k."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_pos
    t = pid % n_pos
    d = tl.arange(0, HALF_PAD)
    dmask = d < HALF
    cs = b * sc_b + t * sc_t + d
    c1 = tl.load(cos_ptr + cs, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + cs + HALF, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + cs, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + cs + HALF, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + b * sq_b + t * sq_t, qo_ptr + b * sqo_b + t * sqo_t, sq_h, sqo_h, hq,
                  c1, c2, s1, s2, d, dmask, HALF, BLOCK_H, BACKWARD)
    _rotate_heads(k_ptr + b * sk_b + t * sk_t, ko_ptr + b * sko_b + t * sko_t, sk_h, sko_h, hk,
                  c1, c2, s1, s2, d, dmask, HALF, BLOCK_H, BACKWARD)


def _launch(q: torch.Tensor, k: torch.Tensor, qo: torch.Tensor, ko: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, backward: bool) -> None:
    """q, k, qo, ko: (B, T, H, D) with unit stride on D; cos, sin: (B, T, D) (stride 0 on B allowed)."""
    n_b, n_pos, hq, dim = q.shape
    if n_b * n_pos == 0:
        return
    half = dim // 2
    half_pad = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(hq, k.shape[2])), 4096 // half_pad))
    _rope_kernel[(n_b * n_pos,)](
        q, k, qo, ko, cos, sin, n_pos, hq, k.shape[2], *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3],
        *ko.stride()[:3], cos.stride(0), cos.stride(1), HALF=half, HALF_PAD=half_pad, BLOCK_H=block_h,
        BACKWARD=backward, num_warps=4)


class _Rope(torch.autograd.Function):
    """(q, k) -> (q R(theta), k R(theta)) per position; backward rotates the gradients by -theta.

    Works on (B, T, H, D) views; nothing is saved but cos and sin (B, T, D).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if inplace:
            qo, ko = q, k
            ctx.mark_dirty(q, k)
        else:
            out_dtype = torch.promote_types(q.dtype, cos.dtype)
            qo = torch.empty_like(q, dtype=out_dtype)
            ko = torch.empty_like(k, dtype=out_dtype)
        _launch(q, k, qo, ko, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return qo, ko

    @staticmethod
    def backward(ctx: Any, dqo: torch.Tensor, dko: torch.Tensor) -> tuple[Any, ...]:
        cos, sin = ctx.saved_tensors
        dqo = dqo if dqo.stride(-1) == 1 else dqo.contiguous()
        dko = dko if dko.stride(-1) == 1 else dko.contiguous()
        dq = torch.empty_like(dqo, dtype=ctx.dtypes[0])
        dk = torch.empty_like(dko, dtype=ctx.dtypes[1])
        _launch(dqo, dko, dq, dk, cos, sin, backward=True)
        return dq, dk, None, None, None


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"apply_rope: {name} has dtype {t.dtype}; allowed: {_DTYPES}")
        if t.device != q.device:
            raise ValueError(f"apply_rope: {name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be 4-D with an even head dim")
    if cos.shape != sin.shape or cos.dim() != 3:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be (B, T, D)")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope: cos/sin that require grad are not supported (use rope_reference)")
    if inplace and torch.promote_types(q.dtype, cos.dtype) != q.dtype:
        raise ValueError(f"apply_rope: inplace=True needs an output in q's dtype {q.dtype}; cos is {cos.dtype}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1,
               inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `rope_reference(q, k, cos, sin, unsqueeze_dim)`, one Triton launch each way.

    unsqueeze_dim: 1 for (B, H, T, D) q/k, 2 for (B, T, H, D). inplace: write the result into q and k.
    """
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"apply_rope: unsqueeze_dim={unsqueeze_dim} is not supported; allowed: 1, 2")
    _check(q, k, cos, sin, inplace)
    if unsqueeze_dim == 1:  # (B, H, T, D) -> (B, T, H, D) views
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    n_b, n_pos, _, dim = q.shape
    if k.shape[0] != n_b or k.shape[1] != n_pos or k.shape[3] != dim or cos.shape[1:] != (n_pos, dim) \
            or cos.shape[0] not in (1, n_b):
        raise ValueError(f"apply_rope: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)} "
                         "do not agree on batch, positions and head dim (after the unsqueeze_dim layout)")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        if inplace:
            raise ValueError("apply_rope: inplace=True needs q and k with a contiguous head dim")
        q, k = q.contiguous(), k.contiguous()
    # one stride pair serves both (the kernel indexes them alike); stride 0 over a batch of 1
    cos, sin = cos.contiguous().expand(n_b, n_pos, dim), sin.contiguous().expand(n_b, n_pos, dim)
    qo, ko = _Rope.apply(q, k, cos, sin, inplace)
    if unsqueeze_dim == 1:
        qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
    return qo, ko
