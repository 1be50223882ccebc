"""slimtune.dtypes: one name table, and each place that reads a dtype name takes its own subset of it."""

import json

import pytest
import torch

from slimtune.dtypes import DTYPES, SHORT_NAMES, TORCH_NAMES, dtype_name, parse_dtype
from slimtune.infer.loading import load_for_inference
from slimtune.quant.options import parse_compute_dtype
from slimtune.quant_format.nf4 import quantize_4bit
from slimtune.quant_format.state import QuantState
from slimtune.train.device import autocast_dtype, weights_dtype


def test_names_round_trip() -> None:
    for name in TORCH_NAMES:
        assert dtype_name(DTYPES[name]) == name
    assert [DTYPES[n] for n in SHORT_NAMES] == [DTYPES[n] for n in TORCH_NAMES]
    assert DTYPES["half"] is torch.float16


def test_parse_dtype_takes_only_the_allowed_names() -> None:
    assert parse_dtype("bf16", "k") is torch.bfloat16
    assert parse_dtype("float16", "k", TORCH_NAMES) is torch.float16
    with pytest.raises(ValueError, match=r"k='bf16' is not an allowed dtype; use one of float32, bfloat16, float16"):
        parse_dtype("bf16", "k", TORCH_NAMES)
    for bad in ("int8", "torch.float16", "", None, torch.float16, 16):
        with pytest.raises(ValueError, match="k="):
            parse_dtype(bad, "k")
    # A caller's own value ("auto") may be listed for the error, but never parses here.
    with pytest.raises(ValueError, match="use one of auto, fp32"):
        parse_dtype("auto", "k", ("auto", "fp32"))


def test_compute_dtype_spellings() -> None:
    for value in ("float16", "fp16", "half", "torch.float16", torch.float16):
        assert parse_compute_dtype(value, "compute_dtype") is torch.float16
    with pytest.raises(ValueError, match=r"compute_dtype='int8' is not an allowed dtype"):
        parse_compute_dtype("torch.int8", "compute_dtype")


def test_precision_dtypes() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None and weights_dtype("fp32", cpu) is torch.float32
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp16", cpu) is torch.float16
    assert autocast_dtype("auto", cpu) is None
    with pytest.raises(ValueError, match="train.precision='float16'"):
        autocast_dtype("float16", cpu)


def test_cli_dtype_refused_before_loading() -> None:
    with pytest.raises(ValueError, match=r"--dtype='int8' is not an allowed dtype; use one of auto, fp32, float32"):
        load_for_inference("no-such-model", dtype="int8", device="cpu")


def test_quant_state_dtype_field() -> None:
    packed, state = quantize_4bit(torch.randn(4, 64, dtype=torch.bfloat16))
    tensors = state.as_dict("w.")
    assert QuantState.from_dict(tensors, "w.", packed=packed).dtype is torch.bfloat16
    key = "w.quant_state.bitsandbytes__nf4"
    fields = {"quant_type": "nf4", "blocksize": 64, "dtype": "bf16", "shape": [4, 64], "nested_blocksize": 256,
              "nested_dtype": "float32", "nested_offset": state.state2.offset.item()}
    tensors[key] = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"{key}: dtype='bf16' is not an allowed dtype; use one of float32"):
        QuantState.from_dict(tensors, "w.")
