"""Triton 4-bit dequantization against the torch reference (quant_format/nf4.py), bit for bit."""

import pytest
import torch

pytest.importorskip("triton")

from slimtune.kernels.nf4_dequant import dequantize_4bit_reference, dequantize_4bit_triton  # noqa: E402
from slimtune.quant_format.nf4 import quantize_4bit  # noqa: E402
from slimtune.quant_format.state import NestedState, QuantState  # noqa: E402

CASES = [  # (shape, quant_type, blocksize, double_quant, dtype)
    ((64, 48), "nf4", 64, True, torch.float32),
    ((33, 7), "fp4", 32, False, torch.float16),
    ((300, 1030), "nf4", 128, True, torch.float16),
    ((5,), "nf4", 64, True, torch.float32),
    ((2, 4099), "fp4", 4096, True, torch.float32),
]


def _truncate_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by dropping the low 16 bits (what Triton's interpreter does for .to(bf16))."""
    return (x.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("shape,quant_type,blocksize,double_quant,dtype", CASES)
def test_bit_identical_to_reference(shape, quant_type, blocksize, double_quant, dtype, kernel_device):
    torch.manual_seed(hash((shape, quant_type)) % 1000)
    weight = torch.randn(shape, dtype=dtype, device=kernel_device) * 3
    packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant)
    out = torch.full(shape, float("nan"), dtype=dtype, device=kernel_device)  # poisoned: every element written
    dequantize_4bit_triton(packed, state, out=out)
    assert torch.equal(out, dequantize_4bit_reference(packed, state))


def test_bf16_output(kernel_device):
    torch.manual_seed(1)
    weight = torch.randn(96, 64, dtype=torch.bfloat16, device=kernel_device)
    packed, state = quantize_4bit(weight, "nf4", 64, True)
    out = dequantize_4bit_triton(packed, state)
    exact = dequantize_4bit_reference(packed, state)
    if kernel_device == "cuda":
        assert torch.equal(out, exact)
    else:  # the interpreter truncates fp32 -> bf16; the logic before the cast is checked exactly
        state32 = type(state)(**{**state.__dict__, "dtype": torch.float32})
        assert torch.equal(out, _truncate_bf16(dequantize_4bit_reference(packed, state32)))
        assert (out.float() - exact.float()).abs().max() <= exact.float().abs().max() * 2**-7


def test_other_output_dtype_and_errors(kernel_device):
    weight = torch.randn(16, 64, device=kernel_device)
    packed, state = quantize_4bit(weight, "nf4", 64, False)
    half = dequantize_4bit_triton(packed, state, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, dequantize_4bit_reference(packed, state).half())
    with pytest.raises(ValueError, match="needs 512"):
        dequantize_4bit_triton(packed[:10], state)
    with pytest.raises(TypeError, match="not supported"):
        dequantize_4bit_triton(packed, state, dtype=torch.int8)


@pytest.mark.gpu
def test_gpu_llama_shape_matches_reference_and_bitsandbytes():
    torch.manual_seed(0)
    weight = torch.randn(4096, 1024, dtype=torch.bfloat16, device="cuda")
    packed, state = quantize_4bit(weight, "nf4", 64, True)
    out = dequantize_4bit_triton(packed, state)
    assert torch.equal(out, dequantize_4bit_reference(packed, state))
    bnb = pytest.importorskip("bitsandbytes")
    q, bs = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = QuantState(absmax=bs.absmax, shape=bs.shape, dtype=bs.dtype, blocksize=bs.blocksize,
                        quant_type=bs.quant_type, code=bs.code,
                        state2=NestedState(bs.state2.absmax, bs.state2.code, bs.offset, bs.state2.blocksize))
    assert torch.equal(dequantize_4bit_triton(q, theirs), bnb.functional.dequantize_4bit(q, bs))
