"""Linear4bit: forward/backward values, what backward saves, state_dict layout, dtype handling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtune.quant import Linear4bit, dequantize_4bit, quantize_4bit


def _linear(in_f: int = 96, out_f: int = 40, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_is_matmul_with_dequantized_weight(compute_dtype: torch.dtype) -> None:
    lin = _linear()
    q = Linear4bit.from_linear(lin, compute_dtype=compute_dtype)
    assert (q.in_features, q.out_features) == (96, 40)
    x = torch.randn(2, 3, 96)
    w = dequantize_4bit(q.weight, q.quant_state).to(compute_dtype)
    expected = torch.nn.functional.linear(x.to(compute_dtype), w, lin.bias.to(compute_dtype)).float()
    out = q(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 40)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # 4-bit error is visible but bounded: the layer is not a silent copy of the fp32 one.
    ref = lin(x)
    assert 0 < (out - ref).abs().max() < 0.25 * ref.abs().max()


def test_dequantize_returns_compute_dtype_weight() -> None:
    lin = _linear()
    q = Linear4bit.from_linear(
        lin, quant_type="fp4", blocksize=128, double_quant=False, compute_dtype=torch.bfloat16
    )
    w = q.dequantize()
    assert w.dtype == torch.bfloat16 and w.shape == (40, 96)
    assert torch.equal(w, dequantize_4bit(*quantize_4bit(lin.weight.data, "fp4", 128, False)).bfloat16())


def test_backward_gives_input_grad_only_and_matches_dense() -> None:
    lin = _linear()
    q = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    x = torch.randn(4, 96, requires_grad=True)
    q(x).pow(2).sum().backward()
    w = q.dequantize().detach()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, w, q.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert not q.weight.requires_grad and q.weight.grad is None
    assert q.bias is not None and not q.bias.requires_grad and q.bias.grad is None


def test_trainable_bias_gets_its_gradient() -> None:
    q = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32)
    q.bias.requires_grad_(True)
    x = torch.randn(2, 5, 96)
    g = torch.randn(2, 5, 40)
    q(x).backward(g)
    torch.testing.assert_close(q.bias.grad, g.sum((0, 1)))


def test_backward_does_not_save_the_full_weight() -> None:
    q = Linear4bit.from_linear(_linear(in_f=128, out_f=64), compute_dtype=torch.float32)
    saved_shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_shapes.append(tuple(t.shape))
        return t

    x = torch.randn(3, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = q(x)
    assert saved_shapes, "expected the packed weight to be saved"
    assert (64, 128) not in saved_shapes and (128, 64) not in saved_shapes
    assert max(torch.Size(s).numel() for s in saved_shapes) < 64 * 128
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (3, 128)

    # The dense layer, for contrast, does save its full weight: the hook can see it.
    dense_saved: list[tuple[int, ...]] = []
    lin = nn.Linear(128, 64)
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: dense_saved.append(tuple(t.shape)) or t, lambda t: t
    ):
        lin(x)
    assert any(torch.Size(s).numel() == 64 * 128 for s in dense_saved)


def test_state_dict_is_bitsandbytes_layout_and_round_trips() -> None:
    q = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32)
    sd = q.state_dict()
    assert set(sd) == {
        "weight",
        "bias",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    }
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (40 * 96 // 2, 1)
    other = Linear4bit.from_linear(_linear(seed=1), compute_dtype=torch.float32)
    other.load_state_dict(sd)
    assert torch.equal(other.dequantize(), q.dequantize())


def test_half_keeps_codes_and_fp32_scales() -> None:
    q = Linear4bit.from_linear(_linear(), double_quant=False, compute_dtype=torch.float16)
    before = q.dequantize()
    q.half()
    assert q.weight.dtype == torch.uint8 and q.quant_state.absmax.dtype == torch.float32
    assert q.bias.dtype == torch.float16
    assert torch.equal(q.dequantize(), before)


def test_rejects_bad_arguments() -> None:
    packed, state = quantize_4bit(torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match=r"2-D .*\(2, 3, 64\)"):
        Linear4bit(packed, state)
    packed, state = quantize_4bit(torch.randn(8, 64))
    with pytest.raises(TypeError, match="compute_dtype torch.int8"):
        Linear4bit(packed, state, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"bias shape \(5,\)"):
        Linear4bit(packed, state, bias=torch.zeros(5))
