"""Triton RMSNorm with a hand-written backward: one kernel each way instead of transformers' ~6.

    rms_norm(x (..., C), weight (C,), eps) -> y (..., C)

equals `rms_norm_reference`, which is LlamaRMSNorm.forward (also Qwen2's and Mistral's) line for line:
upcast x to fp32, variance = mean(x^2), x * rsqrt(variance + eps), cast back to x's dtype, times weight
(in the promoted dtype of weight and x). The kernel keeps those roundings: the normalized row is
rounded to x's dtype before the weight multiplies it, so on a GPU the output differs from eager only
by the order of the sum of squares.

Saved for backward: x (the residual stream, kept by the caller anyway) and rstd (one fp32 per row).
Eager autograd saves the fp32 copy of x, the fp32 normalized x and its cast: 2 + 4 + 4 bytes per bf16
element more than this.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm", "rms_norm_reference"]

_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, as transformers writes it."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


@triton.jit
def _rms_forward(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, stride_x, stride_y,
                 IN_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: y = w * cast(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    xn = (x * rstd).to(IN_DTYPE).to(tl.float32)  # LlamaRMSNorm casts back before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * xn).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_backward(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, stride_dy, stride_x,
                  stride_dx, IN_DTYPE: tl.constexpr, HAS_DW: tl.constexpr, BLOCK: tl.constexpr):
    """Rows pid, pid + P, ... of dx; this program's partial dw sum goes to row pid of dw (P, C) fp32."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, n_rows, n_prog):
        row64 = tl.cast(row, tl.int64)
        dy = tl.load(dy_ptr + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row64)
        xhat = x * rstd
        if HAS_DW:
            dw += dy * xhat.to(IN_DTYPE).to(tl.float32)
        g = dy * w  # gradient of the normalized row
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + row64 * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_DW:
        tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)


def _block(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n_cols: one pass over the padded row, 8-16 elements a thread."""
    block = triton.next_power_of_2(n_cols)
    return block, min(16, max(1, block // 512))


def _backward_programs(n_rows: int, device: torch.device) -> int:
    """Programs for backward: each loops over rows and keeps one partial dw row, so not one per row."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))


class _RMSNorm(torch.autograd.Function):
    """y = w * xhat,  xhat = x * rstd,  rstd = (mean(x^2) + eps)^-1/2, per row of C elements.

    With g = dy * w (the gradient of xhat):
        dx = rstd * (g - xhat * mean(g * xhat))      (the projection of g off xhat, scaled)
        dw = sum over rows of dy * xhat               (xhat rounded to x's dtype, as forward used it)
    Casts count as identities for the gradient, as autograd treats them. Saved: x and rstd (N,) fp32.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape, n_cols = x.shape, x.shape[-1]
        x2 = x.reshape(-1, n_cols)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block, warps = _block(n_cols)
        if x2.shape[0]:
            _rms_forward[(x2.shape[0],)](x2, weight, y, rstd, n_cols, eps, x2.stride(0), y.stride(0),
                                         IN_DTYPE=_TL[x.dtype], BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        has_dw = ctx.needs_input_grad[1]
        n_prog = _backward_programs(n_rows, x2.device)
        dw = torch.empty((n_prog, n_cols) if has_dw else (1,), dtype=torch.float32, device=x2.device)
        block, warps = _block(n_cols)
        if n_rows:
            _rms_backward[(n_prog,)](dy2, x2, weight, rstd, dx, dw, n_rows, n_cols, dy2.stride(0), x2.stride(0),
                                     dx.stride(0), IN_DTYPE=_TL[x2.dtype], HAS_DW=has_dw, BLOCK=block,
                                     num_warps=warps)
        grad_w = None
        if has_dw:
            grad_w = (dw.sum(0) if n_rows else torch.zeros(n_cols, device=x2.device)).to(weight.dtype)
        return dx.view(ctx.shape), grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim of x (..., C); same result as `rms_norm_reference`.

    x and weight: bf16, fp16 or fp32, on one device (CUDA, or CPU under TRITON_INTERPRET=1).
    """
    if x.dtype not in _TL or weight.dtype not in _TL:
        raise TypeError(f"rms_norm: dtypes x={x.dtype}, weight={weight.dtype} are not supported; "
                        f"allowed: {tuple(_TL)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match x's last dim "
                         f"{x.shape[-1]} (x shape {tuple(x.shape)})")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")
    return _RMSNorm.apply(x, weight if weight.is_contiguous() else weight.contiguous(), float(eps))
