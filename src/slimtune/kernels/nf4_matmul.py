"""Triton fused dequantize-matmul for decode-size inputs: y = x W^T (+ b), W packed NF4/FP4, M <= 16 rows.

Reference: `matmul_4bit_reference` (dequantize with quant_format/nf4.py, then F.linear).

At decode time x has a few rows and the cost of a linear layer is streaming its weight: 0.53 byte per
weight in 4 bits (+ double-quantized scales) against 2 in bf16. Dequantizing first writes and
re-reads a full bf16 copy, so this kernel never materializes W. It is a CUDA-core GEMV, not a
tensor-core GEMM: with M <= 4 the multiply-adds are cheap and the cost is in decoding the nibbles.
Where it is used, and the H200 numbers behind that: Note: decode routing in nf4_routing.py.

# Note: the decode GEMV layout
The packed bytes are read as int32 words, 8 weights per word (K % 8 == 0, so a word never crosses a
row or an absmax block). Byte b of a little-endian word holds weights 2b (high nibble, bits 8b+4..)
and 2b+1 (low nibble, bits 8b..). A program owns BLOCK_N rows of W and BLOCK_M rows of x, and walks
K (or its share of K with split-K) BLOCK_KW words at a time:
    words      (BN, BKW)   int32, one coalesced load per row of W
    codes      the 8 codes of each word: on the GPU 4 x (BN, BKW) int32 pairs in x's dtype, looked up
               in registers (Note: codebook lookup in registers (PRMT)); under the interpreter
               8 x (BN, BKW) fp32 gathered from the 16-entry table
    x          2 x (BN, BKW) int64 per row of x: the word's 8 inputs (stride 0 along BN, so that all
               loads of the loop share one layout and Triton inserts no shared-memory conversion)
    acc_m      (BN, BKW)   += scale(word) * sum over the 8 weights of code * x[m]
               (on the GPU: Note: the packed dot)
and reduces each acc_m over the words once at the end. The scale is applied per word (a word is
inside one absmax block); with double quantization it is read from a cached fp32 copy (default,
Note: the cached fp32 scales) or decoded in the kernel (`load_absmax`, scale_cache=False). Inputs
of more than BLOCK_M rows run cdiv(M, BLOCK_M) programs per tile, each decoding the tile again.

Feeding tl.dot with dequantized (BN, blocksize) tiles instead runs 15-20x slower than cuBLAS on the
bf16 weight at these row counts: the tensor cores idle on a tile of 1-16 rows while the decode dominates.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slimtune.kernels.nf4_dequant import absmax_args, load_absmax
from slimtune.quant_format.nf4 import block_absmax, dequantize_4bit
from slimtune.quant_format.state import QuantState

__all__ = ["matmul_4bit_triton", "matmul_4bit_reference", "supports", "MAX_ROWS", "pick_config", "sm_count"]

MAX_ROWS = 16


@triton.jit
def _codes(words, code_ptr):
    """The 8 code values (fp32) of each int32 word, in k order, gathered from the 16-entry table.

    Under the interpreter, where inline PTX cannot run (Note: codebook lookup in registers (PRMT))."""
    c0 = tl.load(code_ptr + ((words >> 4) & 0xF))
    c1 = tl.load(code_ptr + (words & 0xF))
    c2 = tl.load(code_ptr + ((words >> 12) & 0xF))
    c3 = tl.load(code_ptr + ((words >> 8) & 0xF))
    c4 = tl.load(code_ptr + ((words >> 20) & 0xF))
    c5 = tl.load(code_ptr + ((words >> 16) & 0xF))
    c6 = tl.load(code_ptr + ((words >> 28) & 0xF))
    c7 = tl.load(code_ptr + ((words >> 24) & 0xF))
    return c0, c1, c2, c3, c4, c5, c6, c7


# Note: codebook lookup in registers (PRMT)
# prmt.b32 d, a, b, sel picks 4 bytes out of the 8 bytes of (a, b), one per 4-bit selector (3 index
# bits; with the 4th bit set it gives 0xFF or 0x00 from the sign of the picked byte). The codebook,
# rounded to x's dtype (bf16 or fp16), is held as 8 registers: the low bytes of codes 0-15 (L0..L3)
# and their high bytes (H0..H3). For the 4 nibbles of one half-word, s = nibble & 7 looks up codes 0-7
# and 8-15 of both byte tables (4 prmt), the nibbles' bit 3 becomes a byte mask m (1 prmt on the sign
# bits of w and w << 4), one lop3 per table keeps the right half ((m & b) | (~m & a), LUT 0xD8), and
# two prmt interleave low and high bytes into pairs in k order (weight 2i in the low half, 2i + 1 in
# the high half, as x's pairs lie in memory). 21 integer instructions per 8 weights, no memory access.
# The CPU interpreter cannot run PTX: tests/kernels/test_nf4_matmul.py executes this text (and the dot
# below) instruction by instruction in Python, and the GPU tests run it for real.
_PAIRS_ASM = tl.constexpr("""{
.reg .b32 s, t, u, a, b, c, d, m, lo, hi;
and.b32 s, $4, 0x77777777;
shl.b32 u, $4, 4;
prmt.b32 a, $5, $6, s;
prmt.b32 b, $7, $8, s;
prmt.b32 c, $9, $10, s;
prmt.b32 d, $11, $12, s;
prmt.b32 m, u, $4, 0xD9C8;
lop3.b32 lo, a, b, m, 0xD8;
lop3.b32 hi, c, d, m, 0xD8;
prmt.b32 $0, lo, hi, 0x4051;
prmt.b32 $1, lo, hi, 0x6273;
shr.b32 t, s, 16;
prmt.b32 a, $5, $6, t;
prmt.b32 b, $7, $8, t;
prmt.b32 c, $9, $10, t;
prmt.b32 d, $11, $12, t;
prmt.b32 m, u, $4, 0xFBEA;
lop3.b32 lo, a, b, m, 0xD8;
lop3.b32 hi, c, d, m, 0xD8;
prmt.b32 $2, lo, hi, 0x4051;
prmt.b32 $3, lo, hi, 0x6273;
}""")

# Note: the packed dot
# On the GPU the 8 products of a word run as 4 two-wide fused multiply-adds in x's dtype (fma.rn.bf16x2
# or .f16x2: both halves at once), accumulating the 4 pairs per half, and only the two half-sums are
# widened to fp32 and added: 4 + 3 instructions per word where the fp32 path converts 8 codes and 8
# inputs and runs 8 fp32 FMAs. The word's partial sum is rounded to x's dtype after each of its 4 steps
# (bf16: ~3e-3 relative error on a 4096-long dot, measured in an emulation; the fp32 path ~2e-4,
# bitsandbytes' bf16 GEMV, which rounds each weight and each product to bf16, ~2e-3). Across words the
# kernel accumulates in fp32. The codebook is rounded to x's dtype (prmt_table(code, dtype)).
_DOT_ASM = {
    True: """{
.reg .b32 z, acc, lo, hi;
mov.b32 z, 0;
fma.rn.bf16x2 acc, $1, $5, z;
fma.rn.bf16x2 acc, $2, $6, acc;
fma.rn.bf16x2 acc, $3, $7, acc;
fma.rn.bf16x2 acc, $4, $8, acc;
shl.b32 lo, acc, 16;
and.b32 hi, acc, 0xFFFF0000;
add.f32 $0, lo, hi;
}""",
    False: """{
.reg .b32 z, acc;
.reg .b16 l16, h16;
.reg .f32 lo, hi;
mov.b32 z, 0;
fma.rn.f16x2 acc, $1, $5, z;
fma.rn.f16x2 acc, $2, $6, acc;
fma.rn.f16x2 acc, $3, $7, acc;
fma.rn.f16x2 acc, $4, $8, acc;
mov.b32 {l16, h16}, acc;
cvt.f32.f16 lo, l16;
cvt.f32.f16 hi, h16;
add.f32 $0, lo, hi;
}""",
}
_DOT_BF16 = tl.constexpr(_DOT_ASM[True])
_DOT_F16 = tl.constexpr(_DOT_ASM[False])


@triton.jit
def _code_pairs(words, tab_ptr):
    """The 8 codes of each word as 4 int32 pairs in k order, in the dtype of the table (x's)."""
    zero = words * 0
    return tl.inline_asm_elementwise(
        _PAIRS_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
        [words, zero + tl.load(tab_ptr), zero + tl.load(tab_ptr + 1), zero + tl.load(tab_ptr + 2),
         zero + tl.load(tab_ptr + 3), zero + tl.load(tab_ptr + 4), zero + tl.load(tab_ptr + 5),
         zero + tl.load(tab_ptr + 6), zero + tl.load(tab_ptr + 7)],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _row_dot_packed(p, x_ptr, off, mask, X_BF16: tl.constexpr):
    """_row_dot with the products in x's dtype, two at a time; see Note: the packed dot."""
    lo = tl.load(x_ptr + off, mask=mask, other=0)  # int64: x values 0-3 of each word
    hi = tl.load(x_ptr + off + 1, mask=mask, other=0)  # values 4-7
    args = [p[0], p[1], p[2], p[3], lo.to(tl.int32), (lo >> 32).to(tl.int32), hi.to(tl.int32),
            (hi >> 32).to(tl.int32)]
    if X_BF16:
        d = tl.inline_asm_elementwise(_DOT_BF16, "=r,r,r,r,r,r,r,r,r", args, dtype=tl.int32, is_pure=True, pack=1)
    else:
        d = tl.inline_asm_elementwise(_DOT_F16, "=r,r,r,r,r,r,r,r,r", args, dtype=tl.int32, is_pure=True, pack=1)
    return d.to(tl.float32, bitcast=True)


@triton.jit
def _half_to_f32(bits, X_BF16: tl.constexpr):
    """fp32 value of the 16-bit float in the low half of int32 `bits`."""
    if X_BF16:
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _row_dot(c, x_ptr, off, mask, X_BF16: tl.constexpr):
    """sum over the 8 weights of each word of code * x for one row of x; x read as 2 int64 per word."""
    lo = tl.load(x_ptr + off, mask=mask, other=0)  # int64: x values 0-3 of each word
    hi = tl.load(x_ptr + off + 1, mask=mask, other=0)  # values 4-7
    a = lo.to(tl.int32)
    b = (lo >> 32).to(tl.int32)
    d = c[0] * _half_to_f32(a, X_BF16)  # one fma chain: no separate adds
    d += c[1] * _half_to_f32(a >> 16, X_BF16)
    d += c[2] * _half_to_f32(b, X_BF16)
    d += c[3] * _half_to_f32(b >> 16, X_BF16)
    a = hi.to(tl.int32)
    b = (hi >> 32).to(tl.int32)
    d += c[4] * _half_to_f32(a, X_BF16)
    d += c[5] * _half_to_f32(a >> 16, X_BF16)
    d += c[6] * _half_to_f32(b, X_BF16)
    d += c[7] * _half_to_f32(b >> 16, X_BF16)
    return d


@triton.jit
def _store_row(out_ptr, bias_ptr, acc, m, M, rn, n_mask, stride_om, HAS_BIAS: tl.constexpr,
               SPLIT_K: tl.constexpr):
    y = tl.sum(acc, axis=1)  # (BN,)
    mask = n_mask & (rn * 0 + m < M)
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptr + m * stride_om + rn, y, mask=mask)


@triton.jit
def _load_tile(words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, row_word, n_mask, kw, KW,
               WPB: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """The (BN, BKW) words at word columns kw of the rows, and their fp32 scales."""
    word_idx = row_word[:, None] + kw[None, :]  # (BN, BKW)
    w_mask = n_mask[:, None] & (kw < KW)[None, :]
    words = tl.load(words_ptr + word_idx, mask=w_mask, other=0)
    absmax = load_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, word_idx // WPB, w_mask,
                         NESTED, NESTED_BLOCKSIZE)
    return words, absmax


@triton.jit
def _word_dot(words, tab_ptr, code_ptr, x_ptr, x_off, mask, PRMT: tl.constexpr, X_BF16: tl.constexpr):
    if PRMT:
        return _row_dot_packed(_code_pairs(words, tab_ptr), x_ptr, x_off, mask, X_BF16)
    else:
        return _row_dot(_codes(words, code_ptr), x_ptr, x_off, mask, X_BF16)


@triton.jit
def _gemv4_kernel(x_ptr, words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, tab_ptr, bias_ptr,
                  out_ptr, M, N, KW, stride_xm, stride_om, PRMT: tl.constexpr, BLOCKSIZE: tl.constexpr,
                  NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, X_BF16: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr):
    """See Note: the decode GEMV layout. x_ptr is x viewed as int64 (stride_xm in int64 units), KW = K / 8;
    out is (M, N) in x's dtype, or fp32 zeros when SPLIT_K > 1."""
    WPB: tl.constexpr = BLOCKSIZE // 8  # words per absmax block
    STEP: tl.constexpr = BLOCK_KW * SPLIT_K
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) rows of W = output features
    n_mask = rn < N
    row_word = rn.to(tl.int64) * KW  # (BN,) first word of each row
    # x has no row index along BN; the zeros give its loads the (BN, BKW) shape of the weight tile, so
    # Triton lays out all loads of the loop alike (no layout conversions through shared memory).
    x_rows = (rn * 0)[:, None]
    j = tl.arange(0, BLOCK_KW)
    acc0 = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    for kw0 in range(pid_k * BLOCK_KW, KW, STEP):
        kw = kw0 + j  # (BKW,) word index inside the row
        words, absmax = _load_tile(words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, row_word, n_mask,
                                   kw, KW, WPB, NESTED, NESTED_BLOCKSIZE)
        k_ok = (kw < KW)[None, :]
        x_off = x_rows + (kw * 2)[None, :] + m0 * stride_xm  # (BN, BKW) int64 index of row m0
        acc0 += _word_dot(words, tab_ptr, code_ptr, x_ptr, x_off, k_ok & (x_rows + m0 < M), PRMT,
                          X_BF16) * absmax
        if BLOCK_M > 1:
            acc1 += _word_dot(words, tab_ptr, code_ptr, x_ptr, x_off + stride_xm, k_ok & (x_rows + m0 + 1 < M),
                              PRMT, X_BF16) * absmax
        if BLOCK_M > 2:
            acc2 += _word_dot(words, tab_ptr, code_ptr, x_ptr, x_off + 2 * stride_xm,
                              k_ok & (x_rows + m0 + 2 < M), PRMT, X_BF16) * absmax
            acc3 += _word_dot(words, tab_ptr, code_ptr, x_ptr, x_off + 3 * stride_xm,
                              k_ok & (x_rows + m0 + 3 < M), PRMT, X_BF16) * absmax
    _store_row(out_ptr, bias_ptr, acc0, m0, M, rn, n_mask, stride_om, HAS_BIAS, SPLIT_K)
    if BLOCK_M > 1:
        _store_row(out_ptr, bias_ptr, acc1, m0 + 1, M, rn, n_mask, stride_om, HAS_BIAS, SPLIT_K)
    if BLOCK_M > 2:
        _store_row(out_ptr, bias_ptr, acc2, m0 + 2, M, rn, n_mask, stride_om, HAS_BIAS, SPLIT_K)
        _store_row(out_ptr, bias_ptr, acc3, m0 + 3, M, rn, n_mask, stride_om, HAS_BIAS, SPLIT_K)


def supports(x: torch.Tensor, state: QuantState) -> bool:
    """Whether the kernel handles this call: <= 16 rows of bf16/fp16, a 2-D weight with K % 8 == 0."""
    k = state.shape[-1]
    return (len(state.shape) == 2 and x.shape[-1] == k and k % 8 == 0 and k > 0
            and x.numel() // k <= MAX_ROWS and state.blocksize % 8 == 0
            and x.dtype in (torch.bfloat16, torch.float16))


@functools.cache
def sm_count(device: torch.device | int | None = None) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100/H200 SXM), read once per device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(m: int, n: int, k: int, sms: int = 132) -> dict[str, int]:
    """Tile sizes for (m, n, k) on a card with `sms` SMs; see Note: decode routing in nf4_routing.py."""
    cfg = dict(BLOCK_M=1, BLOCK_N=2, BLOCK_KW=256) if m == 1 else dict(BLOCK_M=4, BLOCK_N=1, BLOCK_KW=128)
    split_k = 1
    while -(-n // cfg["BLOCK_N"]) * split_k < 4 * sms and split_k < 8 and k // 8 >= 2 * cfg["BLOCK_KW"] * split_k:
        split_k *= 2  # fewer than 4 programs per SM: share K
    return dict(cfg, SPLIT_K=split_k, num_warps=4, num_stages=1)


# Note: the cached fp32 scales
# With double quantization every word's scale costs three dependent gathers (code, nested code table,
# nested absmax); by default (scale_cache=True) the (N * K / blocksize,) fp32 scales are decoded once
# per QuantState and the kernel reads one float per word instead. On the H200 that is 9.90 against
# 11.04 us at one row of a 4096 x 4096 weight, and what puts the kernel ahead of bitsandbytes and bf16
# (nf4_routing.py). The price is memory while decoding: 1/16 byte per weight, ~12% of the packed
# weight (0.41 GiB for an 8B model's projections), held as long as the layer's QuantState lives.
_CACHE: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}


def _per_state(state: QuantState, key: tuple, make) -> torch.Tensor:
    """make(state), computed once per (QuantState, key) and dropped with the state."""
    key = (id(state), *key)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is state:
        return hit[1]
    value = make(state)
    _CACHE[key] = (weakref.ref(state, lambda _: _CACHE.pop(key, None)), value)
    return value


def _cached_scales(state: QuantState) -> torch.Tensor:
    return _per_state(state, ("scales",), block_absmax)


def prmt_table(code: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """(16,) codebook -> (8,) int32: low bytes then high bytes of the codes rounded to `dtype` (fp16 or
    bf16), 4 per word, code 0 in the lowest byte; see Note: codebook lookup in registers (PRMT)."""
    h = code.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF  # (16,)
    nbytes = torch.cat([h & 0xFF, h >> 8]).view(8, 4)  # (8 words, 4 bytes)
    # no host tensor here: the first call may happen inside CUDA-graph capture
    words = (nbytes << (torch.arange(4, device=code.device) * 8)).sum(1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # as signed 32-bit


def _prmt_table(state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    return _per_state(state, ("prmt", dtype), lambda st: prmt_table(st.code, dtype))


def matmul_4bit_triton(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
                       config: dict[str, int] | None = None, scale_cache: bool = True) -> torch.Tensor:
    """x (..., K) with at most 16 rows, W = dequantize(packed) (N, K) -> x W^T + b (..., N), in x's dtype.

    scale_cache: read double-quantized scales from a cached fp32 copy (Note: the cached fp32 scales)."""
    if not supports(x, state):
        raise ValueError(f"matmul_4bit_triton: unsupported call x {tuple(x.shape)} {x.dtype}, weight "
                         f"{tuple(state.shape)} blocksize {state.blocksize}; allowed: <= {MAX_ROWS} rows, "
                         f"bf16/fp16, 2-D weight with in_features % 8 == 0")
    n, k = int(state.shape[0]), int(state.shape[1])
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 4 or x2.data_ptr() % 8:
        x2 = x2.contiguous()  # read as int64 (4 values), see _row_dot
    m = x2.shape[0]
    cfg = dict(config or pick_config(m, n, k, sm_count(x.device)))
    split_k = cfg.pop("SPLIT_K", 1)
    block_m = cfg.pop("BLOCK_M", min(4, triton.next_power_of_2(m)))
    if split_k == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    nested = state.state2 is not None
    if nested and scale_cache:
        scale_args = (_cached_scales(state),) * 4
        nested = False
    else:
        scale_args = absmax_args(state)
    words = packed.reshape(-1).view(torch.uint8).view(torch.int32)
    prmt = cfg.pop("PRMT", x.is_cuda)  # inline PTX: not under the CPU interpreter
    tab = _prmt_table(state, x.dtype) if prmt else words
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split_k, triton.cdiv(m, block_m))
    _gemv4_kernel[grid](
        x2.view(torch.int64) if x2.numel() else x2, words, *scale_args, state.code.float(), tab, bias if bias is not None else out, out,
        m, n, k // 8, x2.stride(0) // 4, out.stride(0),
        BLOCKSIZE=state.blocksize, NESTED=nested,
        NESTED_BLOCKSIZE=state.state2.blocksize if state.state2 is not None else 256,
        HAS_BIAS=bias is not None, X_BF16=x.dtype == torch.bfloat16, PRMT=prmt,
        BLOCK_M=block_m, SPLIT_K=split_k, **cfg,
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
