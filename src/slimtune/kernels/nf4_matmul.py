"""Triton fused dequantize-matmul for decode-size inputs: y = x W^T (+ b), W packed NF4/FP4, M <= 16 rows.

Reference: `matmul_4bit_reference` (dequantize with quant/nf4.py, then F.linear).

At decode time x has 1-16 rows and the cost of a linear layer is streaming its weight: 0.53 byte per
weight in 4 bits (+ double-quantized scales) against 2 in bf16. Dequantizing first writes and
re-reads a full bf16 copy (2.5 + 2 bytes per weight), so the kernel never materializes W: each
program owns BLOCK_N output features, walks K one absmax block (blocksize weights) at a time, unpacks
the (BLOCK_N, blocksize / 2) bytes in registers (codebook lookup times the rows' absmax) and feeds
them to tl.dot with the even and odd columns of the 16-row input tile (Note: even and odd columns). With SPLIT_K > 1 the K range is shared by SPLIT_K
programs that add fp32 partial sums atomically (more programs for narrow outputs; order of the
additions varies, so results vary in the last bits).

Needs K % blocksize == 0 (every Llama/Qwen/Mistral shape with blocksize 64); `supports` says when,
and callers fall back to dequantize + matmul otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slimtune.kernels.nf4_dequant import absmax_args, load_absmax
from slimtune.quant.nf4 import dequantize_4bit
from slimtune.quant.state import QuantState

__all__ = ["matmul_4bit_triton", "matmul_4bit_reference", "supports", "MAX_ROWS", "pick_config"]

MAX_ROWS = 16


@triton.jit
def _matmul4_kernel(x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, bias_ptr,
                    out_ptr, M, N, K, stride_xm, stride_om,
                    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    HB: tl.constexpr = BLOCKSIZE // 2  # bytes of one absmax block
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output features = rows of W
    rm = tl.arange(0, BLOCK_M)
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    j = tl.arange(0, HB)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Note: even and odd columns. A byte holds weights k and k + 1 of a row; instead of interleaving
    # the two nibbles into one (BN, BLOCKSIZE) tile (a register shuffle through shared memory), the
    # high nibbles multiply the even columns of x and the low nibbles the odd ones: two dots.
    # One step covers one absmax block of every row, so its scale is a (BN,) vector.
    for k0 in range(pid_k * BLOCKSIZE, K, BLOCKSIZE * SPLIT_K):
        byte = tl.load(packed_ptr + rn64[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=n_mask[:, None],
                       other=0)  # (BN, HB)
        absmax = load_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, (rn64 * K + k0) // BLOCKSIZE, n_mask,
                             NESTED, NESTED_BLOCKSIZE)[:, None]  # (BN, 1)
        w_even = (tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax).to(x_ptr.dtype.element_ty)
        w_odd = (tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * absmax).to(x_ptr.dtype.element_ty)
        x_idx = rm[:, None] * stride_xm + (k0 + 2 * j)[None, :]  # (BM, HB)
        x_even = tl.load(x_ptr + x_idx, mask=rm[:, None] < M, other=0.0)
        x_odd = tl.load(x_ptr + x_idx + 1, mask=rm[:, None] < M, other=0.0)
        acc = tl.dot(x_even, tl.trans(w_even), acc)  # (BM, HB) @ (HB, BN)
        acc = tl.dot(x_odd, tl.trans(w_odd), acc)
    out_idx = rm[:, None] * stride_om + rn[None, :]
    out_mask = (rm[:, None] < M) & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_idx, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptr + out_idx, acc, mask=out_mask)


def supports(x: torch.Tensor, state: QuantState) -> bool:
    """Whether the kernel handles this call: <= 16 rows, 2-D weight, K a multiple of the blocksize."""
    k = state.shape[-1]
    return (len(state.shape) == 2 and x.shape[-1] == k and x.numel() // max(k, 1) <= MAX_ROWS
            and k % state.blocksize == 0 and 32 <= state.blocksize <= 256
            and x.dtype in (torch.bfloat16, torch.float16))


def pick_config(m: int, n: int, k: int, blocksize: int) -> dict[str, int]:
    """Tile sizes: enough programs to fill 132 SMs several times over (split K for narrow outputs)."""
    block_n = 32
    programs = -(-n // block_n)
    split_k = 1
    while programs * split_k < 1024 and split_k < 8 and k // blocksize >= 8 * split_k:
        split_k *= 2
    return dict(BLOCK_N=block_n, SPLIT_K=split_k, num_warps=4, num_stages=3)


def matmul_4bit_triton(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
                       config: dict[str, int] | None = None) -> torch.Tensor:
    """x (..., K) with at most 16 rows, W = dequantize(packed) (N, K) -> x W^T + b (..., N), in x's dtype."""
    if not supports(x, state):
        raise ValueError(f"matmul_4bit_triton: unsupported call x {tuple(x.shape)} {x.dtype}, weight "
                         f"{tuple(state.shape)} blocksize {state.blocksize}; see supports()")
    n, k = int(state.shape[0]), int(state.shape[1])
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = dict(config or pick_config(m, n, k, state.blocksize))
    split_k = cfg["SPLIT_K"]
    out = (torch.empty if split_k == 1 else torch.zeros)(
        (m, n), dtype=x.dtype if split_k == 1 else torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _matmul4_kernel[grid](
        x2, packed.reshape(-1).view(torch.uint8), *absmax_args(state), state.code.float(),
        bias if bias is not None else out, out, m, n, k, x2.stride(0), out.stride(0),
        BLOCKSIZE=state.blocksize, NESTED=state.state2 is not None,
        NESTED_BLOCKSIZE=state.state2.blocksize if state.state2 is not None else 256,
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, **cfg,
    )
    if split_k > 1:
        if bias is not None:
            out += bias.float()
        out = out.to(x.dtype)
    return out.reshape(*x.shape[:-1], n)


def matmul_4bit_reference(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: dequantize W to x's dtype, then F.linear."""
    weight = dequantize_4bit(packed, state).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
