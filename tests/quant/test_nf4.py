"""quantize_4bit / dequantize_4bit / QuantState against bitsandbytes on CPU (bit for bit)."""

from __future__ import annotations

import itertools

import pytest
import torch

from slimtune.quant import QuantState, dequantize_4bit, quantize_4bit
from slimtune.quant_format.codebooks import dynamic_map, get_code

bnbF = pytest.importorskip("bitsandbytes.functional")
_bnb_default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")

SHAPES = [(7, 33), (1, 65), (300, 257), (64, 64), (5,), (3, 4, 130), (16, 96)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 256, 4096]


def _weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def _bnb_absmax_fp32(state) -> torch.Tensor:
    if not state.nested:
        return state.absmax
    return bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset


def _bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' CPU dequantization, or its flat-block python reference where its C kernel errs.

    Note: bitsandbytes 0.50.2's CPU C kernel for dequantize_4bit (used when the last dim is even)
    assumes blocks never straddle rows; with a last dim that is not a multiple of the blocksize
    (e.g. (16, 96) at blocksize 64, or (64, 64) at blocksize 256) it applies the wrong absmax and
    does not invert its own quantize_4bit. There we compare with bitsandbytes' pure-torch
    reference op (the same flat block layout as its CUDA kernel and its quantizer).
    """
    last = state.shape[-1]
    if last % 2 == 0 and last % state.blocksize == 0:
        return bnbF.dequantize_4bit(packed, state)
    reference = _bnb_default_ops._dequantize_4bit_compute.__wrapped__  # eager, not torch.compile
    return reference(
        packed.reshape(-1), _bnb_absmax_fp32(state), state.code, state.blocksize, state.shape, state.dtype
    )


def test_codebooks_match_bitsandbytes() -> None:
    assert torch.equal(get_code("nf4"), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(get_code("fp4"), bnbF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map())


@pytest.mark.parametrize(
    "shape,dtype,quant_type,double_quant,blocksize",
    list(itertools.product(SHAPES, DTYPES, ["nf4", "fp4"], [False, True], BLOCKSIZES)),
)
def test_bit_identical_to_bitsandbytes(shape, dtype, quant_type, double_quant, blocksize) -> None:
    w = _weight(shape, dtype, seed=len(shape) * 1000 + shape[-1])
    ref_packed, ref = bnbF.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    packed, state = quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)

    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    assert state.absmax.dtype == ref.absmax.dtype
    assert torch.equal(state.absmax, ref.absmax)
    assert torch.equal(state.code, ref.code)
    if double_quant:
        assert torch.equal(state.state2.absmax, ref.state2.absmax)
        assert torch.equal(state.state2.offset, ref.offset)
        assert torch.equal(state.state2.code, ref.state2.code)
        assert state.state2.blocksize == ref.state2.blocksize == 256

    out = dequantize_4bit(packed, state)
    expected = _bnb_dequantize(ref_packed, ref)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, expected.reshape(w.shape))


def test_dequantized_error_is_bounded_by_half_a_code_step() -> None:
    w = _weight((64, 128), torch.float32)
    for quant_type in ("nf4", "fp4"):
        out = dequantize_4bit(*quantize_4bit(w, quant_type=quant_type, double_quant=False))
        absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
        code = get_code(quant_type).sort().values
        max_gap = (code[1:] - code[:-1]).max()
        err = ((out - w).reshape(-1, 64).abs() / absmax).max()
        assert err <= max_gap / 2 + 1e-6


def test_small_values_and_zeros_pick_bitsandbytes_nibbles() -> None:
    # Hits FP4's +0/-0 tie rule and exact zeros of both codebooks.
    w = torch.tensor([[1.0, 0.0, 1e-4, -1e-4, 0.0026, -0.0026, 0.5, -1.0] * 8])
    for quant_type in ("nf4", "fp4"):
        ref_packed, _ = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        packed, _ = quantize_4bit(w, quant_type=quant_type, double_quant=False)
        assert torch.equal(packed, ref_packed)


def test_zero_blocks_match_bitsandbytes() -> None:
    w = torch.zeros(3, 64)
    w[1] = torch.linspace(-1, 1, 64)
    for dq in (False, True):
        ref_packed, ref = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        packed, state = quantize_4bit(w, double_quant=dq)
        assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
        assert torch.equal(dequantize_4bit(packed, state), bnbF.dequantize_4bit(ref_packed, ref))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_as_dict_matches_bitsandbytes_serialization(double_quant: bool, dtype: torch.dtype) -> None:
    w = _weight((48, 80), dtype)
    _, ref = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    _, state = quantize_4bit(w, double_quant=double_quant)
    ours, theirs = state.as_dict(), ref.as_dict(packed=True)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    prefixed = state.as_dict(prefix="weight.")
    expected = {"weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(prefixed) == expected


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_dict_round_trips_both_ways(double_quant: bool) -> None:
    w = _weight((33, 70), torch.bfloat16)
    packed, state = quantize_4bit(w, quant_type="fp4", blocksize=128, double_quant=double_quant)
    # ours -> bitsandbytes
    ref_state = bnbF.QuantState.from_dict(dict(state.as_dict()), device=torch.device("cpu"))
    assert torch.equal(_bnb_dequantize(packed, ref_state), dequantize_4bit(packed, state))
    # bitsandbytes -> ours
    ref_packed, ref = bnbF.quantize_4bit(w, blocksize=128, compress_statistics=double_quant, quant_type="fp4")
    loaded = QuantState.from_dict(ref.as_dict(packed=True))
    assert loaded.shape == w.shape and loaded.dtype == w.dtype and loaded.blocksize == 128
    assert torch.equal(dequantize_4bit(ref_packed, loaded), _bnb_dequantize(ref_packed, ref))


def test_from_dict_names_missing_keys() -> None:
    _, state = quantize_4bit(_weight((8, 64), torch.float32))
    tensors = state.as_dict(prefix="model.layers.0.mlp.up_proj.weight.")
    del tensors["model.layers.0.mlp.up_proj.weight.nested_absmax"]
    with pytest.raises(ValueError, match=r"up_proj\.weight.*nested_absmax"):
        QuantState.from_dict(tensors, prefix="model.layers.0.mlp.up_proj.weight.")
    with pytest.raises(ValueError, match="quant_state.bitsandbytes__nf4"):
        QuantState.from_dict({"w.absmax": torch.zeros(1)}, prefix="w.")


def test_rejects_bad_inputs_with_clear_messages() -> None:
    w = _weight((4, 64), torch.float32)
    with pytest.raises(TypeError, match=r"torch\.int32.*allowed"):
        quantize_4bit(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"blocksize 100 .*allowed.*4096"):
        quantize_4bit(w, blocksize=100)
    with pytest.raises(ValueError, match=r"quant_type 'int4' .*'nf4'"):
        quantize_4bit(w, quant_type="int4")
    packed, state = quantize_4bit(w)
    with pytest.raises(ValueError, match="needs 128"):
        dequantize_4bit(packed[:10], state)
