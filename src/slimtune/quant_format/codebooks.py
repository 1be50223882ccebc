"""Codebooks (quantization maps) for 4-bit NF4 / FP4 and the 8-bit dynamic map used for absmax.

A codebook is a small fp32 vector; a quantized value is an index into it. NF4 holds 16 quantiles of
N(0, 1) rescaled to [-1, 1] (QLoRA, Dettmers et al. 2023), with an exact zero. FP4 is a 1-sign /
2-exponent / 1-mantissa float listed in bit-pattern order (index = nibble), so it holds +0 and -0.
The dynamic map (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning") is the
signed 8-bit code that double quantization uses for the absmax vector.

All three are bit-identical to bitsandbytes' tables (tests/quant/test_nf4.py::test_codebooks_match_bitsandbytes).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["NF4_VALUES", "FP4_VALUES", "get_code", "sorted_code", "dynamic_map"]

# NF4: the 8 positive and 7 negative normal quantiles of QLoRA plus an exact zero, ascending.
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (e2m1, exponent bias 2): the magnitude for bit patterns 0b000..0b111, before normalizing by
# the largest (12). Index 8..15 are the same magnitudes with the sign bit set.
_FP4_MAGNITUDES: tuple[float, ...] = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_VALUES: tuple[float, ...] = _FP4_MAGNITUDES + tuple(-m for m in _FP4_MAGNITUDES)


@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        # Divide in fp32 (not in Python doubles) so each entry is the correctly rounded fp32 ratio.
        raw = torch.tensor(FP4_VALUES, dtype=torch.float32)
        return raw / raw.abs().max()
    raise ValueError(f"quant_type {quant_type!r} is not supported; allowed: ('nf4', 'fp4')")


def get_code(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry fp32 codebook (16,) of `quant_type`, indexed by nibble value. Do not modify it."""
    return _code_cpu(quant_type).to(device or "cpu")


@functools.cache
def _sorted_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cpu(quant_type)
    # A stable sort keeps +0 (index 0) before -0 (index 8) for FP4; see Note: matching bitsandbytes.
    values, order = torch.sort(code, stable=True)
    return values, order


def sorted_code(quant_type: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (16,) ascending fp32, order (16,) int64) with values == get_code(quant_type)[order]."""
    values, order = _sorted_cpu(quant_type)
    return values.to(device), order.to(device)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed, 8 bits, up to 7 exponent bits: for decade k = 0..6 (scale 10^(k-6)) the interval
    # [0.1, 1] is split into 2^k equal bins and the bin centres (fp32) are used with both signs:
    # 2 * (1 + 2 + ... + 64) = 254 values, plus 0 and 1 -> 256.
    entries: list[torch.Tensor] = [torch.zeros(1), torch.ones(1)]
    for k in range(7):
        edges = torch.linspace(0.1, 1.0, 2**k + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scaled = centres * (10.0 ** (k - 6))  # fp32 product, as the reference table is built
        entries += [scaled, -scaled]
    return torch.sort(torch.cat(entries)).values


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The signed 8-bit dynamic codebook (256,) fp32, ascending, from -0.993 to 1.0."""
    return _dynamic_map_cpu().to(device or "cpu")
