"""Fused LoRA linear: y = x W^T + b + s (x A^T) B^T as one autograd op with a hand-written backward.

Reference: `lora_linear_reference` (the same formula in plain autograd); LoraLayer's own forward is
the other reference (tests/kernels/test_lora_linear.py checks both, values and gradients).

Why it is faster and leaner than the plain layer (peft's structure):
  * the LoRA matmuls run in the compute dtype (bf16) in rank-first order, x A^T (N, r) first, and the
    low-rank product is added into the base output in place (one addmm) instead of casting x to the
    fp32 adapter dtype and allocating three (N, out) temporaries;
  * a 4-bit weight is dequantized by Triton into the shared buffer (kernels/dispatch.py) in forward
    and again in backward; nothing of size (out, in) is saved;
  * saved for backward: x (which the caller keeps anyway), x A^T (N, r), and the frozen weights.
Used by LoraLayer on CUDA when it applies (one active adapter, no dropout, no DoRA, nn.Linear or
Linear4bit base); everything else takes the plain path. Under autocast it behaves like an op declared
with torch.amp.custom_fwd(cast_inputs=<the autocast dtype>) (Note: the fused op under autocast).

# Note: the fused op under autocast
The loop trains under bf16 autocast, where the plain layer's F.linear and LoRA matmuls each run in bf16
with the fp32 adapter weights cast per call. lora_linear does the same in one op: x is cast to the
autocast dtype, the op runs with autocast off (forward and backward), and A, B are cast inside; the
fp32 adapters receive the bf16 products' gradients cast to fp32, as autocast's cast would give them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from slimtune.kernels.dispatch import dense_weight, use_triton
from slimtune.kernels.nf4_routing import DECODE_ROWS
from slimtune.quant_format.nf4 import dequantize_4bit
from slimtune.quant_format.state import QuantState

__all__ = ["lora_linear", "lora_linear_reference", "base_matmul"]


def base_matmul(x2: torch.Tensor, weight: torch.Tensor, state: QuantState | None,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x2 (N, in) -> x2 W^T + b (N, out), no autograd.

    4-bit weights: decode-size inputs (N <= DECODE_ROWS on CUDA) take the fused Triton GEMV
    (nf4_matmul.py, see Note: decode routing there); the rest is dequantized by Triton into the shared
    buffer, then cuBLAS multiplies.
    """
    if state is not None and x2.shape[0] <= DECODE_ROWS and use_triton(x2):
        from slimtune.kernels.nf4_matmul import matmul_4bit_triton, supports

        if supports(x2, state):
            return matmul_4bit_triton(x2, weight, state, bias)
    return F.linear(x2, dense_weight(weight, state, x2.dtype), bias)


class _LoraLinear(torch.autograd.Function):
    """Y = X W^T + b + s (X A^T) B^T,   X (N, in), W (out, in) frozen, A (r, in), B (out, r), s scalar.

    With dY (N, out) the gradient of Y:
        dX = dY W + s (dY B) A          (N, out) @ (out, in) + (N, r) @ (r, in)
        dA = s (dY B)^T X               (r, N) @ (N, in)
        dB = s dY^T (X A^T)             (out, N) @ (N, r)
        db = sum over rows of dY        (only when the bias trains)
    dY B (N, r) is formed once and shared by dX and dA; X A^T (N, r) is kept from forward. W is
    rebuilt in backward (for a 4-bit W: one more dequantization into the shared buffer), never saved.
    All products run in the compute dtype with fp32 accumulation; dA and dB are returned in the
    adapter's dtype (fp32 adapters get bf16-rounded gradients, like peft under autocast).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, state: QuantState | None,
                bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float) -> torch.Tensor:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        y = base_matmul(x2, weight, state, None if bias is None else bias.to(dtype))  # (N, out)
        xa = x2 @ a.T  # (N, r): rank first, never an (N, out) temporary
        y.addmm_(xa, b.T, alpha=scaling)
        ctx.save_for_backward(x2, weight, xa, lora_a, lora_b)
        ctx.state, ctx.scaling, ctx.x_shape = state, scaling, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
        with torch.autocast(grad_y.device.type, enabled=False):  # see Note: the fused op under autocast
            return _LoraLinear._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
        x2, weight, xa, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dtype = x2.dtype
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)  # (N, out)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        gb = (g @ b).mul_(s)  # (N, r) = s dY B
        grad_x = grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ dense_weight(weight, ctx.state, dtype)  # (N, in) = dY W
            grad_x.addmm_(gb, a)  # + s (dY B) A
            grad_x = grad_x.reshape(ctx.x_shape)
        if ctx.needs_input_grad[4]:
            grad_a = (gb.T @ x2).to(lora_a.dtype)  # (r, in)
        if ctx.needs_input_grad[5]:
            grad_b = (g.T @ xa).mul_(s).to(lora_b.dtype)  # (out, r)
        if ctx.needs_input_grad[3]:
            grad_bias = g.sum(0, dtype=torch.promote_types(dtype, torch.float32)).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, grad_a, grad_b, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None,
                state: QuantState | None = None) -> torch.Tensor:
    """x (..., in) -> x W^T + b + scaling * (x A^T) B^T (..., out), in x's dtype (the autocast dtype
    under autocast: Note: the fused op under autocast).

    Args:
        weight: frozen (out, in) weight in x's dtype, or the packed 4-bit codes when `state` is given.
        lora_a: (r, in) and lora_b: (out, r), any float dtype (cast to x's dtype for the products).
        state: QuantState of a packed `weight` (Linear4bit.quant_state), else None.
    """
    if weight.requires_grad:
        raise ValueError("lora_linear: the base weight must be frozen (requires_grad=False)")
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return _LoraLinear.apply(x, weight, state, bias, lora_a, lora_b, float(scaling))
    x = x.to(torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type, enabled=False):
        return _LoraLinear.apply(x, weight, state, bias, lora_a, lora_b, float(scaling))


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          scaling: float, bias: torch.Tensor | None = None,
                          state: QuantState | None = None) -> torch.Tensor:
    """Plain autograd version of `lora_linear` (4-bit weights dequantized with quant_format/nf4.py)."""
    w = weight if state is None else dequantize_4bit(weight, state).to(x.dtype)
    base = F.linear(x, w, bias)
    return base + (x @ lora_a.to(x.dtype).T) @ lora_b.to(x.dtype).T * scaling
