"""Triton SwiGLU, h = silu(g) * u, with a backward that recomputes silu from g.

    swiglu(g (..., F), u (..., F)) -> h (..., F)

equals `swiglu_reference`, transformers' LlamaMLP middle: `act_fn(gate_proj(x)) * up_proj(x)` with
act_fn = SiLU: silu(g) rounded to g's dtype, then the product in the promoted dtype. The kernel keeps
that rounding. Eager autograd saves g (for silu), silu(g) and u (for the product): three (N, F)
tensors, 3 x 117 MB for one 8B layer at 4096 tokens in bf16; this saves g and u and recomputes
sigmoid(g) in backward, and makes one pass over memory each way instead of two.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["swiglu", "swiglu_reference", "silu_mul", "silu_mul_backward"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BLOCK = 2048


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u, as LlamaMLP computes it."""
    return F.silu(g) * u


@triton.jit
def _swiglu_forward(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(g_ptr.dtype.element_ty).to(tl.float32)  # act_fn rounds to g's dtype
    tl.store(h_ptr + offs, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = (g * sig).to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=mask)
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = silu(g) * u by the forward kernel, no autograd (g, u contiguous CUDA tensors of one shape)."""
    h = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
    n = g.numel()
    if n:
        _swiglu_forward[(triton.cdiv(n, _BLOCK),)](g, u, h, n, BLOCK=_BLOCK, num_warps=8)
    return h


def silu_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                      du: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) of h = silu(g) * u by the backward kernel, no autograd; du may be dh itself (each element
    of dh is read before its du is written)."""
    dg = torch.empty_like(g)
    du = torch.empty_like(u) if du is None else du
    n = g.numel()
    if n:
        _swiglu_backward[(triton.cdiv(n, _BLOCK),)](dh, g, u, dg, du, n, BLOCK=_BLOCK, num_warps=8)
    return dg, du


class _SwiGLU(torch.autograd.Function):
    """h = silu(g) u,  silu(g) = g sigmoid(g),  elementwise.

        du = dh silu(g)
        dg = dh u silu'(g),   silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g)))
    Saved: g and u only; sigmoid(g) is recomputed in backward (one exp per element).
    """

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        g = g.contiguous()
        u = u.contiguous()
        ctx.save_for_backward(g, u)
        return silu_mul(g, u)

    @staticmethod
    def backward(ctx: Any, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, u = ctx.saved_tensors
        return silu_mul_backward(dh.contiguous(), g, u)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Same result as `swiglu_reference(g, u)`: g and u of one shape, bf16/fp16/fp32, one device."""
    if g.shape != u.shape:
        raise ValueError(f"swiglu: gate {tuple(g.shape)} and up {tuple(u.shape)} must have one shape")
    if g.dtype not in _DTYPES or u.dtype not in _DTYPES:
        raise TypeError(f"swiglu: dtypes gate={g.dtype}, up={u.dtype} are not supported; allowed: {_DTYPES}")
    if g.device != u.device:
        raise ValueError(f"swiglu: gate is on {g.device} but up is on {u.device}")
    return _SwiGLU.apply(g, u)
