"""Fused LoRA SwiGLU MLP: y = down(silu(gate(x)) * up(x)), each projection W x + s B A x, one autograd op
whose backward runs in row tiles.

    lora_mlp(x, gate, up, down) -> y          gate, up, down: Projection(weight, state, bias, lora_a, lora_b, scaling)

Reference: the same MLP built from `lora_linear_reference` and `swiglu_reference` (tests/kernels/
test_lora_mlp.py: values and gradients of x and the six adapter matrices, bf16 and 4-bit bases, one
tile and several). The fast MLP forward (kernels/llama_fused.py) calls it in training when all three
projections take the fused LoRA path.

# Note: what the MLP keeps, and the tiled backward
Built from three `lora_linear` ops and `swiglu`, a checkpointed layer's MLP saves x, g = gate(x),
u = up(x) and h = silu(g) u, and its backward holds dh, dg and du at once: with N rows and F the
intermediate width, up to five (N, F) tensors live in the MLP's backward (640 MiB for the 1B shape at
batch 4 x 2048, the step's peak). Here only x, g and u are saved (h is recomputed from them, one
elementwise pass), and backward walks the rows in tiles: for each tile it rebuilds h, forms dh from
dy, takes the down adapter's gradients, turns dh into dg and du (du written over dh) and adds the tile's
dx and gate / up adapter gradients. The (N, F) transients shrink to three (tile, F) tensors; the
matmuls are the same, split by rows. Forward makes h a tile at a time too (at the checkpoint's
recompute g, u and a whole h would otherwise be alive together). Adapter gradients are summed over tiles in fp32. A 4-bit weight
is dequantized per tile (into the shared buffer, kernels/dispatch.py), so 4-bit bases take fewer,
larger tiles (TILE_BYTES_4BIT).

Under autocast the op behaves like lora_linear (Note: the fused op under autocast there): x is cast to
the autocast dtype and everything runs in it with autocast off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from slimtune.kernels.dispatch import dense_weight
from slimtune.kernels.lora_linear import base_matmul
from slimtune.quant_format.state import QuantState

__all__ = ["Projection", "lora_mlp", "lora_mlp_reference", "tile_rows", "TILE_BYTES", "TILE_BYTES_4BIT"]

TILE_BYTES = 32 << 20
"""Target size of one (tile, F) intermediate in backward, bf16 bases (see Note: what the MLP keeps...)."""
TILE_BYTES_4BIT = 128 << 20
"""The same for 4-bit bases: each extra tile costs three more dequantizations."""


@dataclass(frozen=True)
class Projection:
    """One LoRA projection: frozen weight (out, in) or packed 4-bit codes with their state, optional
    frozen bias, adapter A (r, in) and B (out, r) in any float dtype, scaling s."""

    weight: torch.Tensor
    state: QuantState | None
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float


def tile_rows(n_rows: int, width: int, itemsize: int, four_bit: bool) -> int:
    """Rows per backward tile: a (rows, width) tensor of about TILE_BYTES (TILE_BYTES_4BIT for 4-bit),
    a multiple of 128 rows, at least 128, at most n_rows."""
    target = TILE_BYTES_4BIT if four_bit else TILE_BYTES
    rows = max(128, target // max(1, width * itemsize) // 128 * 128)
    return max(1, min(n_rows, rows))


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u (silu rounded to g's dtype, as LlamaMLP): the Triton kernel on CUDA, torch elsewhere."""
    if g.is_cuda:
        from slimtune.kernels.swiglu import silu_mul

        return silu_mul(g, u)
    return F.silu(g) * u


def _silu_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) of h = silu(g) u; du is written over dh."""
    if g.is_cuda:
        from slimtune.kernels.swiglu import silu_mul_backward

        return silu_mul_backward(dh, g, u, du=dh)
    wide = torch.promote_types(g.dtype, torch.float32)
    gw = g.to(wide)
    sig = torch.sigmoid(gw)
    dg = (dh.to(wide) * u.to(wide) * sig * (1 + gw * (1 - sig))).to(g.dtype)
    return dg, dh.mul_(F.silu(g))


def _project(x2: torch.Tensor, p: Projection) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + b + s (x A^T) B^T, x A^T) in x's dtype, no autograd."""
    dtype = x2.dtype
    y = base_matmul(x2, p.weight, p.state, None if p.bias is None else p.bias.to(dtype))
    xa = x2 @ p.lora_a.to(dtype).T  # (N, r)
    y.addmm_(xa, p.lora_b.to(dtype).T, alpha=p.scaling)
    return y, xa


class _LoraMLP(torch.autograd.Function):
    """y = D(h) with h = silu(G(x)) U(x), each P(z) = z W^T + b + s (z A^T) B^T.

    Per row tile, with dY the tile's output gradient (see Note: what the MLP keeps...):
        h   = silu(g) u                          recomputed
        gbD = s_D dY B_D                          (t, r)
        dh  = dY W_D + gbD A_D                    (t, F)
        dA_D += gbD^T h,   dB_D += s_D dY^T (h A_D^T)
        dg, du = dh u silu'(g), dh silu(g)
        gbG, gbU = s_G dg B_G, s_U du B_U
        dx  = dg W_G + du W_U + gbG A_G + gbU A_U
        dA_G += gbG^T x,   dB_G += s_G dg^T (x A_G^T)      (and likewise for U)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a_g: torch.Tensor, b_g: torch.Tensor, a_u: torch.Tensor,
                b_u: torch.Tensor, a_d: torch.Tensor, b_d: torch.Tensor,
                projections: tuple[Projection, Projection, Projection], rows: int | None) -> torch.Tensor:
        gate, up, down = projections
        x2 = x.reshape(-1, x.shape[-1])  # (N, C)
        g, xa_g = _project(x2, gate)  # (N, F), (N, r)
        u, xa_u = _project(x2, up)
        four_bit = any(p.state is not None for p in projections)
        rows = rows or tile_rows(x2.shape[0], g.shape[1], g.element_size(), four_bit)
        n = x2.shape[0]
        if rows >= n:  # one tile: no copies
            y, xa_d = _project(_silu_mul(g, u), down)
        else:  # h a tile at a time, each tile's output written into y
            y = xa_d = None
            for s in range(0, n, rows):
                y_t, xa_t = _project(_silu_mul(g[s:s + rows], u[s:s + rows]), down)  # (t, C'), (t, r)
                if y is None:
                    y, xa_d = y_t.new_empty(n, y_t.shape[1]), xa_t.new_empty(n, xa_t.shape[1])
                y[s:s + rows], xa_d[s:s + rows] = y_t, xa_t
        ctx.save_for_backward(x2, g, u, xa_g, xa_u, xa_d)
        ctx.projections, ctx.x_shape, ctx.rows = projections, x.shape, rows
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
        with torch.autocast(grad_y.device.type, enabled=False):
            return _LoraMLP._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
        x2, g, u, xa_g, xa_u, xa_d = ctx.saved_tensors
        gate, up, down = ctx.projections
        dtype = x2.dtype
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)  # (N, C')
        a = [p.lora_a.to(dtype) for p in ctx.projections]
        b = [p.lora_b.to(dtype) for p in ctx.projections]
        wide = torch.promote_types(dtype, torch.float32)  # adapter gradients are summed over tiles in it
        acc = [torch.zeros(m.shape, dtype=wide, device=m.device) for pair in zip(a, b) for m in pair]
        need_x = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(x2) if need_x else None
        for s in range(0, x2.shape[0], ctx.rows):
            e = min(s + ctx.rows, x2.shape[0])
            g_t, u_t, dy_t = g[s:e], u[s:e], dy[s:e]
            h_t = _silu_mul(g_t, u_t)
            gb_d = (dy_t @ b[2]).mul_(down.scaling)  # (t, r)
            dh = dy_t @ dense_weight(down.weight, down.state, dtype)  # (t, F)
            dh.addmm_(gb_d, a[2])
            acc[4].add_(gb_d.T @ h_t)
            acc[5].add_((dy_t.T @ xa_d[s:e]).mul_(down.scaling))
            del h_t
            dg, du = _silu_mul_backward(dh, g_t, u_t)
            gb_g = (dg @ b[0]).mul_(gate.scaling)
            gb_u = (du @ b[1]).mul_(up.scaling)
            x_t = x2[s:e]
            acc[0].add_(gb_g.T @ x_t)
            acc[1].add_((dg.T @ xa_g[s:e]).mul_(gate.scaling))
            acc[2].add_(gb_u.T @ x_t)
            acc[3].add_((du.T @ xa_u[s:e]).mul_(up.scaling))
            if need_x:
                dx = grad_x[s:e]
                torch.mm(dg, dense_weight(gate.weight, gate.state, dtype), out=dx)
                dx.addmm_(du, dense_weight(up.weight, up.state, dtype))
                dx.addmm_(gb_g, a[0]).addmm_(gb_u, a[1])
            del dg, du, dh
        params = [m for p in ctx.projections for m in (p.lora_a, p.lora_b)]
        grads = [acc_i.to(m.dtype) if ctx.needs_input_grad[i + 1] else None
                 for i, (acc_i, m) in enumerate(zip(acc, params))]
        return (None if grad_x is None else grad_x.reshape(ctx.x_shape), *grads, None, None)


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection,
             rows: int | None = None) -> torch.Tensor:
    """x (..., C) -> down(silu(gate(x)) * up(x)) (..., C'), in x's dtype (the autocast dtype under autocast).

    Base weights and biases must be frozen; gradients flow to x and the six adapter matrices. rows: backward
    tile height (default `tile_rows`).
    """
    for name, p in (("gate", gate), ("up", up), ("down", down)):
        if p.weight.requires_grad or (p.bias is not None and p.bias.requires_grad):
            raise ValueError(f"lora_mlp: the {name} projection's base weight and bias must be frozen")
    if rows is not None and rows < 1:
        raise ValueError(f"lora_mlp: rows must be >= 1, got {rows}")
    args = (gate.lora_a, gate.lora_b, up.lora_a, up.lora_b, down.lora_a, down.lora_b, (gate, up, down), rows)
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return _LoraMLP.apply(x, *args)
    x = x.to(torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type, enabled=False):
        return _LoraMLP.apply(x, *args)


def lora_mlp_reference(x: torch.Tensor, gate: Projection, up: Projection, down: Projection) -> torch.Tensor:
    """Plain autograd version of `lora_mlp`."""
    from slimtune.kernels.lora_linear import lora_linear_reference
    from slimtune.kernels.swiglu import swiglu_reference

    def proj(z: torch.Tensor, p: Projection) -> torch.Tensor:
        return lora_linear_reference(z, p.weight, p.lora_a, p.lora_b, p.scaling, p.bias, p.state)

    return proj(swiglu_reference(proj(x, gate), proj(x, up)), down)
