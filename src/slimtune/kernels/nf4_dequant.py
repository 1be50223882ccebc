"""Triton NF4/FP4 dequantization (double-quantized absmax included), bit-identical to quant_format/nf4.py.

Reference: `slimtune.quant_format.nf4.dequantize_4bit` (plain torch), re-exported here as
`dequantize_4bit_reference`; tests/kernels/test_nf4_dequant.py checks bit equality against it.

Layout (see quant_format/nf4.py): byte i of `packed` holds values 2i (high nibble) and 2i+1 (low nibble);
value j belongs to absmax block j // blocksize. A program handles NB absmax blocks: it loads a
(NB, blocksize / 2) tile of bytes, the NB absmax scales once, looks both nibbles up in the 16-entry
codebook and writes both values of a byte as one 32-bit (64-bit for fp32) word, see Note: one word
per byte.

# Note: bit equality with bitsandbytes
The output is code[nibble] * absmax rounded once to the output dtype, and a double-quantized absmax
is code2[q] * absmax2[block // 256] + offset with the product rounded before the add (bitsandbytes
dequantizes the nested absmax in one kernel and adds the offset in another). The kernel is compiled
with `enable_fp_fusion=False` so Triton does not contract that mul-add into an FMA, which would
round once and change the last bit of some scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtune.quant_format.nf4 import dequantize_4bit as dequantize_4bit_reference
from slimtune.quant_format.state import QuantState

__all__ = ["dequantize_4bit_triton", "dequantize_4bit_reference", "absmax_args"]

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BYTES_PER_PROGRAM = 4096  # 8192 outputs: 16 KB of bf16 written per program
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _with_numel(state: QuantState, n: int) -> QuantState:
    """The same state for a flat tensor of n values (the packed bytes already hold the pad nibble)."""
    return QuantState(state.absmax, torch.Size([n]), state.dtype, state.blocksize, state.quant_type,
                      state.code, state.state2)


@triton.jit
def load_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask, NESTED: tl.constexpr,
                NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of 4-bit blocks `block` (any shape); see Note: bit equality with bitsandbytes."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(code2_ptr + q) * scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0).to(tl.float32)
    return absmax


@triton.jit
def _dequant_kernel(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr,
                    n_bytes, BLOCKSIZE: tl.constexpr, NB: tl.constexpr, NESTED: tl.constexpr,
                    NESTED_BLOCKSIZE: tl.constexpr, OUT_DTYPE: tl.constexpr, WORD: tl.constexpr):
    """out_ptr is the output viewed as WORD-sized integers, one word = the two values of one byte."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)  # (NB,) absmax blocks
    byte_idx = block[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (NB, HALF)
    mask = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=mask, other=0)
    absmax = load_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block,
                         block * HALF < n_bytes, NESTED, NESTED_BLOCKSIZE)[:, None]  # (NB, 1) fp32
    hi = (tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax).to(OUT_DTYPE)  # value 2i
    lo = (tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * absmax).to(OUT_DTYPE)  # value 2i + 1
    # Note: one word per byte. Value 2i sits at the lower address, i.e. the low half of a
    # little-endian word; writing whole words keeps each thread's stores contiguous (16-byte vectors).
    if WORD == 32:
        word = hi.to(tl.uint16, bitcast=True).to(tl.uint32) | (lo.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)
        tl.store(out_ptr + byte_idx, word.to(tl.int32, bitcast=True), mask=mask)
    else:
        word = hi.to(tl.uint32, bitcast=True).to(tl.uint64) | (lo.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
        tl.store(out_ptr + byte_idx, word.to(tl.int64, bitcast=True), mask=mask)


def absmax_args(state: QuantState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(absmax, code2, absmax2, offset) kernel arguments; the nested ones are dummies without DQ."""
    if state.state2 is None:
        absmax = state.absmax.float() if state.absmax.dtype != torch.float32 else state.absmax
        return absmax, absmax, absmax, absmax
    s2 = state.state2
    offset = s2.offset.reshape(1).float()
    return state.absmax.reshape(-1), s2.code.float(), s2.absmax.float(), offset


def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState, out: torch.Tensor | None = None,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same result as `dequantize_4bit_reference(packed, state).to(dtype)`, rounded once.

    Args:
        packed: (ceil(numel / 2), 1) uint8 codes (any shape with that many bytes).
        state: its QuantState (absmax fp32, or uint8 + state2 with double quantization).
        out: optional contiguous tensor of state.shape to write into (e.g. a reused buffer).
        dtype: output dtype when `out` is None; default state.dtype.
    """
    n = state.shape.numel()
    if packed.numel() * packed.element_size() != (n + 1) // 2:
        raise ValueError(f"dequantize_4bit_triton: packed has {packed.numel() * packed.element_size()} "
                         f"bytes but QuantState shape {tuple(state.shape)} needs {(n + 1) // 2}")
    dtype = out.dtype if out is not None else (dtype or state.dtype)
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dequantize_4bit_triton: output dtype {dtype} is not supported; allowed: {_OUT_DTYPES}")
    if out is None:
        out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    elif out.numel() != n or not out.is_contiguous():
        raise ValueError(f"dequantize_4bit_triton: out must be contiguous with {n} elements, "
                         f"got shape {tuple(out.shape)}")
    if n % 2:  # an odd tail has no full word: write n + 1 values to a temporary and copy n
        tmp = torch.empty(n + 1, dtype=dtype, device=packed.device)
        dequantize_4bit_triton(packed, _with_numel(state, n + 1), out=tmp)
        out.view(-1).copy_(tmp[:n])
        return out
    nb = max(1, _BYTES_PER_PROGRAM // (state.blocksize // 2))
    n_blocks = -(-n // state.blocksize)
    nested_bs = state.state2.blocksize if state.state2 is not None else 256
    word = 32 if dtype != torch.float32 else 64
    words = out.view(-1).view(torch.int32 if word == 32 else torch.int64)
    _dequant_kernel[(triton.cdiv(n_blocks, nb),)](
        packed.reshape(-1).view(torch.uint8), *absmax_args(state), state.code.float(), words, n // 2,
        BLOCKSIZE=state.blocksize, NB=nb, NESTED=state.state2 is not None, NESTED_BLOCKSIZE=nested_bs,
        OUT_DTYPE=_TL_DTYPES[dtype], WORD=word, num_warps=8 if nb * state.blocksize >= 4096 else 4,
        enable_fp_fusion=False,
    )
    return out
