"""Sequence-chunked MLP recompute: a long sequence's MLP working set, one chunk at a time (benchmarks/long_context.py;
no run config sets it).

A Llama MLP down(silu(gate(x)) * up(x)) keeps four (B, T, F) tensors for backward: at T = 350k tokens
and F = 14336 in bf16 that is 4 x 9.3 GiB inside one checkpointed layer, more than the rest of the
layer together. The MLP treats every position alone, so `SequenceChunkedMLP` saves only its input x
and runs the MLP `chunk` positions at a time: forward without autograd; backward recomputes one chunk
with autograd, back-propagates it (the MLP's trainable weights accumulate their gradients there, as
under reentrant checkpointing) and frees it before the next. Backward then holds one chunk's
intermediates (4 x B x chunk x F) instead of the whole sequence's, for one more MLP forward. The MLP
must be deterministic (no dropout) and position-wise. Values and gradients equal the plain MLP's
(tests/bench/test_seq_chunk.py). It nests inside the layer's non-reentrant checkpoint, which saves x.

    chunk_mlps(model, chunk=16384)   # wraps every decoder layer's `mlp`; returns how many
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SequenceChunkedMLP", "chunk_mlps"]


class _ChunkedRecompute(torch.autograd.Function):
    """y = mlp(x) chunk by chunk along dim 1; saves x only, recomputes each chunk in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mlp: nn.Module, chunk: int) -> torch.Tensor:
        ctx.mlp, ctx.chunk = mlp, chunk
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.save_for_backward(x)
        return torch.cat([mlp(part) for part in x.split(chunk, dim=1)], dim=1)  # (B, T, C'), no graph

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(x) if need_x else None
        device, dtype, enabled = ctx.autocast
        for start in range(0, x.shape[1], ctx.chunk):
            part = x[:, start:start + ctx.chunk].detach().requires_grad_(need_x)
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.mlp(part)  # (B, c, C'): one chunk's intermediates
            torch.autograd.backward(out, grad[:, start:start + ctx.chunk])
            if need_x:
                grad_x[:, start:start + ctx.chunk] = part.grad
            del out, part
        return grad_x, None, None


class SequenceChunkedMLP(nn.Module):
    """Wraps a position-wise module `mlp` (x (B, T, C) -> (B, T, C')): chunks of `chunk` positions."""

    def __init__(self, mlp: nn.Module, chunk: int) -> None:
        super().__init__()
        if chunk < 1:
            raise ValueError(f"SequenceChunkedMLP: chunk must be >= 1 position, got {chunk}")
        self.mlp, self.chunk = mlp, chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] <= self.chunk:
            return self.mlp(x)
        if not torch.is_grad_enabled():  # inference: nothing is saved, chunks only bound the transients
            return torch.cat([self.mlp(part) for part in x.split(self.chunk, dim=1)], dim=1)
        return _ChunkedRecompute.apply(x, self.mlp, self.chunk)


def chunk_mlps(model: nn.Module, chunk: int) -> int:
    """Wrap the `mlp` of every module that has one (decoder layers) in SequenceChunkedMLP; returns the count."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "mlp", None), nn.Module)
              and not isinstance(m, SequenceChunkedMLP) and not isinstance(m.mlp, SequenceChunkedMLP)]
    for layer in layers:
        layer.mlp = SequenceChunkedMLP(layer.mlp, chunk)
    return len(layers)
