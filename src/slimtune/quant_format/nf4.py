"""4-bit NormalFloat / FP4 blockwise quantization in plain torch, bit-compatible with bitsandbytes.

A weight of any shape is flattened and cut into blocks of `blocksize` values. Each block is scaled
by its absolute maximum (absmax, fp32) into [-1, 1], and every value is replaced by the index of
the nearest entry of a 16-value codebook (NF4 or FP4). Two 4-bit indices are packed per byte, the
first value in the high nibble. With double quantization the fp32 absmax vector itself is
quantized: its mean (the offset) is subtracted and the rest is coded with the 8-bit dynamic map in
blocks of 256, which brings the scale overhead from 32 / blocksize to about 8 / blocksize bits per
weight.

The public API is two functions, `quantize_4bit` and `dequantize_4bit`; the state they exchange is
`QuantState` (see state.py), which serializes to bitsandbytes' exact key layout.
"""

from __future__ import annotations

import functools

import torch

from slimtune.quant_format.codebooks import dynamic_map, get_code, sorted_code
from slimtune.quant_format.state import NestedState, QuantState, check_blocksize

__all__ = ["quantize_4bit", "dequantize_4bit", "VALID_QUANT_TYPES", "VALID_DTYPES"]

VALID_QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
VALID_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
NESTED_BLOCKSIZE = 256

# Note: matching bitsandbytes bit for bit
# bitsandbytes' CPU path (the reference we test against) makes a few choices that change bits, and
# we copy each of them on purpose:
#  * 4-bit: values of full blocks are scaled by multiplying with the fp32 reciprocal 1/absmax, but
#    the trailing partial block is divided by its absmax. The absmax used for scaling is clamped to
#    >= 1e-38; the stored absmax is the unclamped one for full blocks and the clamped one for the
#    trailing block (an all-zero tail therefore stores 1e-38, a full zero block stores 0).
#  * 4-bit: the nearest code is found against the fp32 midpoints of the sorted codebook, a value
#    exactly on a midpoint goes to the lower code. FP4 holds +0 and -0; a stable sort puts +0
#    first, so values in (-eps, 0] take the +0 nibble 0b0000 and values in (0, eps] the -0 nibble
#    0b1000 (both dequantize to zero).
#  * 8-bit absmax (double quant): values are multiplied by the fp32 reciprocal of the block absmax,
#    mapped onto a grid of 65536 points over [-1, 1] (index = trunc(((v + 1) * 0.5) * 65535 + 0.5))
#    and each grid point takes its nearest code. This is an approximation of nearest-code search
#    (bitsandbytes' CPU kernel; its CUDA kernel searches exactly, so codes of values within
#    ~1.5e-5 of a midpoint may differ from a GPU-quantized checkpoint, by one code step).
#    An all-zero block codes to index 0.
#  * Dequantization multiplies code * absmax in fp32 and rounds once to the output dtype.
#  * The double-quant offset is torch's mean of the fp32 absmax on the weight's device, as in
#    bitsandbytes; CPU and CUDA reductions may differ in the last bit, so nested absmax codes of a
#    weight quantized on GPU can differ from the CPU ones (4-bit codes and absmax never do: checked
#    on an H200).
# By design the 4-bit rules differ from bitsandbytes' CUDA kernels only on exact ties (not checked:
# our GPU machine has no bitsandbytes).


def _check_inputs(weight: torch.Tensor, quant_type: str, blocksize: int) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize_4bit expects a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in VALID_DTYPES:
        raise TypeError(
            f"quantize_4bit: weight dtype {weight.dtype} is not supported; "
            f"allowed: {', '.join(str(d) for d in VALID_DTYPES)}"
        )
    if weight.numel() == 0:
        raise ValueError(f"quantize_4bit: weight of shape {tuple(weight.shape)} is empty")
    _check_quant_type(quant_type)
    check_blocksize(blocksize)


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in VALID_QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not supported; allowed: {VALID_QUANT_TYPES}")


def _blockwise_scale_4bit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale a flat fp32 vector (N,) block by block into [-1, 1].

    Returns (scaled (N,) fp32, absmax (ceil(N / blocksize),) fp32). See Note: matching bitsandbytes.
    """
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, (tail / tail_absmax).clamp(-1, 1)])
    return scaled, absmax


def _nearest_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Index (int64, same shape) of the nearest codebook entry; midpoint ties go to the lower value."""
    values, order = sorted_code(quant_type, scaled.device)
    midpoints = (values[:-1] + values[1:]) / 2  # (15,) fp32
    return order[torch.searchsorted(midpoints, scaled, right=False)]


def _pack_nibbles(indices: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Pack (N,) indices in [0, 16) into (ceil(N / 2), 1) uint8, first index in the high nibble."""
    if indices.numel() % 2:
        # An odd tail is padded with the code of 0.0, as bitsandbytes does.
        zero = _nearest_4bit(torch.zeros(1, device=indices.device), quant_type)
        indices = torch.cat([indices, zero])
    nibbles = indices.to(torch.uint8).view(-1, 2)
    return ((nibbles[:, 0] << 4) | nibbles[:, 1]).unsqueeze(1)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n / 2), 1) uint8 -> (n,) int64 indices, high nibble first."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()


def _quantize_blockwise_8bit(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp32 (N,) with the 8-bit dynamic map: (codes (N,) uint8, absmax (blocks,) fp32).

    See Note: matching bitsandbytes (the 65536-step grid).
    """
    n = values.numel()
    n_blocks = -(-n // blocksize)
    # Zero padding never changes a block's absmax; padded codes are cut off below.
    blocks = torch.nn.functional.pad(values, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks * (1.0 / absmax).unsqueeze(1)).clamp(-1, 1)  # (n_blocks, blocksize)
    normed = torch.nan_to_num(normed, nan=-1.0)  # 0 * inf in all-zero blocks; overwritten below
    grid_index = (((normed + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)  # truncation, in [0, 65535]
    codes = _dynamic_grid_lookup(values.device)[grid_index]
    codes = torch.where((absmax == 0).unsqueeze(1), 0, codes)  # 0/0 blocks code to index 0
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


def _dynamic_grid_lookup(device: torch.device) -> torch.Tensor:
    """(65536,) int64: nearest dynamic-map index for each grid point -1 + 2 i / 65535 (fp32)."""
    return _dynamic_grid_lookup_cpu().to(device)


@functools.cache
def _dynamic_grid_lookup_cpu() -> torch.Tensor:
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(midpoints, grid, right=False)  # ties at a midpoint go to the lower code


def _dequantize_blockwise_8bit(codes: torch.Tensor, state2: NestedState) -> torch.Tensor:
    """Inverse of _quantize_blockwise_8bit plus the offset: (N,) uint8 -> (N,) fp32."""
    values = state2.code[codes.long()]
    n = values.numel()
    blocks = torch.arange(n, device=values.device) // state2.blocksize
    return values * state2.absmax[blocks] + state2.offset


def quantize_4bit(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a float tensor to packed 4-bit codes, bit-compatible with bitsandbytes.

    Args:
        weight: any shape, fp32 / bf16 / fp16, e.g. a Linear weight (out_features, in_features).
        quant_type: "nf4" (NormalFloat) or "fp4".
        blocksize: values per absmax block, one of quant_format.state.VALID_BLOCKSIZES.
        double_quant: also quantize the absmax vector to 8 bits (QLoRA's double quantization).

    Returns:
        packed: (ceil(numel / 2), 1) uint8, two codes per byte, the first in the high nibble.
        state: QuantState with absmax (fp32, or uint8 plus a NestedState when double_quant).
    """
    _check_inputs(weight, quant_type, blocksize)
    scaled, absmax = _blockwise_scale_4bit(weight.detach().reshape(-1).float(), blocksize)
    packed = _pack_nibbles(_nearest_4bit(scaled, quant_type), quant_type)
    state2 = None
    if double_quant:
        offset = absmax.mean()
        codes, absmax2 = _quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
        state2 = NestedState(
            absmax=absmax2, code=dynamic_map(weight.device).clone(), offset=offset, blocksize=NESTED_BLOCKSIZE
        )
        absmax = codes
    state = QuantState(
        absmax=absmax,
        shape=torch.Size(weight.shape),
        dtype=weight.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=get_code(quant_type, weight.device).clone(),
        state2=state2,
    )
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Rebuild the float tensor from packed codes: (ceil(numel / 2), 1) uint8 -> state.shape, state.dtype.

    The product code * absmax is formed in fp32 and rounded once to `state.dtype`, as bitsandbytes does.
    """
    n = state.shape.numel()
    expected = (n + 1) // 2
    if packed.numel() * packed.element_size() != expected:
        raise ValueError(
            f"dequantize_4bit: packed tensor has {packed.numel() * packed.element_size()} bytes but "
            f"QuantState shape {tuple(state.shape)} needs {expected}"
        )
    values = state.code.float()[_unpack_nibbles(packed, n)]  # (n,) fp32
    blocks = torch.arange(n, device=values.device) // state.blocksize
    return (values * block_absmax(state)[blocks]).to(state.dtype).reshape(state.shape)


def block_absmax(state: QuantState) -> torch.Tensor:
    """(n_blocks,) fp32 absmax of the 4-bit blocks, the double-quantized ones decoded."""
    if state.state2 is None:
        return state.absmax.float()
    return _dequantize_blockwise_8bit(state.absmax.reshape(-1), state.state2).float()
