"""Triton fused dequantize-matmul for decode-size inputs: y = x W^T (+ b), W packed NF4/FP4, M <= 16 rows.

Reference: `matmul_4bit_reference` (dequantize with quant/nf4.py, then F.linear).

At decode time x has 1-16 rows and the cost of a linear layer is streaming its weight: 0.53 byte per
weight in 4 bits (+ double-quantized scales) against 2 in bf16. Dequantizing first writes and
re-reads a full bf16 copy (2.5 + 2 bytes per weight), so the kernel never materializes W: each
program owns BLOCK_N output features, walks K in BLOCK_K steps, unpacks a (BLOCK_N, BLOCK_K) tile in
registers (codebook lookup times the absmax of each of its BLOCK_K / blocksize blocks) and feeds it
to tl.dot with the (16, BLOCK_K) input tile. With SPLIT_K > 1 the K range is shared by SPLIT_K
programs that add fp32 partial sums atomically (more programs for narrow outputs; order of the
additions varies, so results vary in the last bits).

Needs K % blocksize == 0 and BLOCK_K % blocksize == 0 (every Llama/Qwen/Mistral shape with
blocksize 64); `supports` says when, and callers fall back to dequantize + matmul otherwise.
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
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    HALF_K: tl.constexpr = BLOCK_K // 2
    NBLK: tl.constexpr = BLOCK_K // BLOCKSIZE  # absmax blocks per row of a tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output features = rows of W
    rm = tl.arange(0, BLOCK_M)
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rkb = k0 // 2 + tl.arange(0, HALF_K)  # byte column within a row of W
        byte = tl.load(packed_ptr + rn64[:, None] * (K // 2) + rkb[None, :], mask=n_mask[:, None], other=0)
        blk = (rn64[:, None] * K + k0) // BLOCKSIZE + tl.arange(0, NBLK)[None, :]  # (BN, NBLK)
        absmax = load_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, n_mask[:, None],
                             NESTED, NESTED_BLOCKSIZE)
        hi = tl.load(code_ptr + (byte >> 4).to(tl.int32))
        lo = tl.load(code_ptr + (byte & 0xF).to(tl.int32))
        w = tl.join(hi, lo).reshape(BLOCK_N, NBLK, BLOCKSIZE) * absmax[:, :, None]
        w = w.reshape(BLOCK_N, BLOCK_K).to(x_ptr.dtype.element_ty)  # (BN, BK), rounded like dequantize
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=rm[:, None] < M, other=0.0)
        acc += tl.dot(x, tl.trans(w))  # (BM, BK) @ (BK, BN)
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
            and k % state.blocksize == 0 and state.blocksize <= 256 and x.dtype in (torch.bfloat16, torch.float16))


def pick_config(m: int, n: int, k: int, blocksize: int) -> dict[str, int]:
    """Tile sizes by output width; measured on an H200 (docs/benchmarks.md, gemv sweep)."""
    block_k = max(256, blocksize)
    block_n = 32 if n >= 8192 else 16
    programs = -(-n // block_n)
    split_k = 1 if programs >= 256 else 2
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4, num_stages=3)


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
    while k % cfg["BLOCK_K"] and cfg["BLOCK_K"] > state.blocksize:  # tiles must not run past K
        cfg["BLOCK_K"] //= 2
    if cfg["BLOCK_K"] % state.blocksize or k % cfg["BLOCK_K"]:
        raise ValueError(f"matmul_4bit_triton: BLOCK_K {cfg['BLOCK_K']} must be a multiple of blocksize "
                         f"{state.blocksize} dividing K={k}")
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
