"""Linear4bit's packed bytes held in a float dtype (Note: quant storage): same bytes, outputs, grads and state_dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtune.quant import Linear4bit


def _layers(storage: torch.dtype, in_f: int = 96, out_f: int = 41) -> tuple[Linear4bit, Linear4bit]:
    """(uint8-stored layer, the same layer with `storage`); out_f=41: 1968 codes, not a multiple of 8 bytes."""
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    ref = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    other = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    other.set_quant_storage(storage)
    return ref, other


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_float_storage_holds_the_same_bytes_and_computes_the_same(storage: torch.dtype) -> None:
    ref, q = _layers(storage)
    size = torch.empty((), dtype=storage).element_size()
    assert q.weight.dtype == storage and q.weight.shape == (-(-ref.weight.numel() // size), 1)
    assert not q.weight.requires_grad
    assert q.packed_weight().dtype == torch.uint8 and torch.equal(q.packed_weight(), ref.weight)
    assert q.packed_weight().data_ptr() == q.weight.data_ptr()  # a view, not a copy
    x = torch.randn(3, 96, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, out2 = ref(x), q(x2)
    assert torch.equal(out, out2)
    out.square().sum().backward()
    out2.square().sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(q.dequantize(), ref.dequantize())


def test_float_storage_keeps_the_bitsandbytes_state_dict_and_loads_it() -> None:
    ref, q = _layers(torch.bfloat16)
    sd, sd_ref = q.state_dict(), ref.state_dict()
    assert sorted(sd) == sorted(sd_ref)
    for k in sd:
        assert sd[k].dtype == sd_ref[k].dtype and torch.equal(sd[k], sd_ref[k]), k
    fresh = _layers(torch.bfloat16)[1]
    with torch.no_grad():
        fresh.weight.zero_()
    fresh.load_state_dict(sd_ref)
    assert fresh.weight.dtype == torch.bfloat16 and torch.equal(fresh.packed_weight(), ref.weight)


def test_dtype_casts_never_touch_the_packed_bytes() -> None:
    ref, q = _layers(torch.bfloat16)
    q.half()
    assert q.weight.dtype == torch.bfloat16 and torch.equal(q.packed_weight(), ref.weight)
    q.to(torch.float64)
    assert q.weight.dtype == torch.bfloat16 and torch.equal(q.packed_weight(), ref.weight)
    q.set_quant_storage(torch.uint8)
    assert q.weight.shape == ref.weight.shape and torch.equal(q.weight, ref.weight)


def test_integer_storage_other_than_uint8_is_refused() -> None:
    _, q = _layers(torch.bfloat16)
    with pytest.raises(TypeError, match="torch.int32 is not supported; allowed: torch.uint8 or a float dtype"):
        q.set_quant_storage(torch.int32)
