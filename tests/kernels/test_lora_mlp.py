"""Fused LoRA MLP (kernels/lora_mlp.py): values and gradients against the plain composition, one backward
tile and several, bf16 and 4-bit bases; when the fast MLP forward takes it; CUDA parity and memory under `-m gpu`."""

import pytest
import torch

from slimtune import LoraConfig, get_peft_model
from slimtune.kernels import set_fast_path
from slimtune.kernels.lora_mlp import Projection, lora_mlp, lora_mlp_reference, tile_rows
from slimtune.quant_format.nf4 import quantize_4bit

C, F, R = 48, 80, 4


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    set_fast_path("auto")


def _projections(dtype, four_bit=False, bias=False, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for d_in, d_out, s in ((C, F, 0.5), (C, F, 2.0), (F, C, 1.0)):
        w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        state = None
        if four_bit:
            w, state = quantize_4bit(w.to(device), "nf4", 64, True)
            state.dtype = dtype  # dequantize straight to the compute dtype
        else:
            w = w.to(device, dtype)
        a = (torch.randn(R, d_in, generator=g) / d_in**0.5).to(device, dtype).requires_grad_(True)
        b = (torch.randn(d_out, R, generator=g) / R**0.5).to(device, dtype).requires_grad_(True)
        bvec = torch.randn(d_out, generator=g).to(device, dtype) if bias else None
        out.append(Projection(w, state, bvec, a, b, s))
    return out


def _adapters(projections):
    return [m for p in projections for m in (p.lora_a, p.lora_b)]


def _run(fn, x, projections, **kw):
    for t in [x, *_adapters(projections)]:
        t.grad = None
    y = fn(x, *projections, **kw)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape))
    return y.detach(), [t.grad.clone() for t in [x, *_adapters(projections)]]


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("rows", [None, 4, 7])
def test_values_and_grads_match_reference_fp64(four_bit, rows):
    projections = _projections(torch.float64, four_bit, bias=True)
    x = torch.randn(2, 11, C, dtype=torch.float64).requires_grad_(True)
    got, got_grads = _run(lora_mlp, x, projections, rows=rows)
    want, want_grads = _run(lora_mlp_reference, x, projections)
    torch.testing.assert_close(got, want)
    assert len(got_grads) == 7
    for name, g, w in zip(["x", "A_gate", "B_gate", "A_up", "B_up", "A_down", "B_down"], got_grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)


def test_tiles_change_nothing_but_rounding_in_bf16():
    projections = _projections(torch.bfloat16)
    x = torch.randn(3, 40, C, dtype=torch.bfloat16).requires_grad_(True)
    one, one_grads = _run(lora_mlp, x, projections, rows=10**6)
    many, many_grads = _run(lora_mlp, x, projections, rows=16)  # 8 tiles, last one partial
    assert torch.equal(one, many)  # rows are computed alike on CPU, tile or not
    for g1, gn in zip(one_grads, many_grads):
        assert ((g1.float() - gn.float()).norm() / g1.float().norm()).item() < 1e-2
    # x's gradient is per row, so tiling leaves it bit for bit
    assert torch.equal(one_grads[0], many_grads[0])


def test_frozen_base_and_only_needed_grads():
    projections = _projections(torch.float32)
    x = torch.randn(5, C)  # x does not need a gradient: only the adapters get one
    for p in projections[:2]:
        p.lora_a.requires_grad_(False)
    lora_mlp(x, *projections).sum().backward()
    assert projections[0].lora_a.grad is None and projections[2].lora_a.grad is not None
    w = projections[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="gate projection's base weight and bias must be frozen"):
        lora_mlp(x, *projections)
    w.requires_grad_(False)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        lora_mlp(x, *projections, rows=0)


def test_autocast_casts_x_and_answers_in_bf16():
    projections = _projections(torch.float32)
    x = torch.randn(2, 9, C, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = _run(lora_mlp, x, projections)
    want, want_grads = _run(lora_mlp_reference, x, projections)
    assert got.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got_grads)
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2
    for g, w in zip(got_grads, want_grads):
        assert ((g - w).norm() / w.norm()).item() < 5e-2


def test_tile_rows():
    assert tile_rows(8192, 8192, 2, False) == 2048  # 32 MiB tiles for the 1B shape at batch 4
    assert tile_rows(2048, 14336, 2, True) == 2048  # 8B QLoRA b1: one tile (dequantization per tile)
    assert tile_rows(8192, 14336, 2, True) == 4608
    assert tile_rows(50, 10**6, 2, False) == 50  # never more than the rows, at least 128 else
    assert tile_rows(10**6, 10**6, 4, False) == 128


def _llama(target_modules, bias="none"):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    return get_peft_model(model, LoraConfig(r=2, target_modules=target_modules, bias=bias))


@pytest.mark.parametrize("targets, bias, takes", [
    (["gate_proj", "up_proj", "down_proj"], "none", True),
    (["gate_proj", "up_proj"], "none", False),  # down has no adapter: the per-projection path
    (["gate_proj", "up_proj", "down_proj"], "all", True),  # Llama's MLP has no biases to train
])
def test_fused_swiglu_takes_lora_mlp_only_in_training_with_three_adapters(targets, bias, takes):
    pytest.importorskip("triton")
    from slimtune.kernels.llama_fused import lora_projections

    model = _llama(targets, bias)
    mlp = model.get_base_model().model.layers[0].mlp
    set_fast_path("on")
    x = torch.randn(2, 3, 32)
    assert (lora_projections(mlp, x) is not None) == takes
    with torch.no_grad():
        assert lora_projections(mlp, x) is None  # inference: nothing is saved, the plain fused path
    set_fast_path("off")
    assert lora_projections(mlp, x) is None


@pytest.mark.gpu
@pytest.mark.parametrize("four_bit", [False, True])
def test_gpu_matches_reference_and_keeps_less(four_bit):
    projections = _projections(torch.bfloat16, four_bit, device="cuda")
    x = torch.randn(4, 512, C, dtype=torch.bfloat16, device="cuda").requires_grad_(True)
    got, got_grads = _run(lora_mlp, x, projections, rows=384)
    set_fast_path("off")  # the reference dequantizes with the torch code, not Triton
    want, want_grads = _run(lora_mlp_reference, x, projections)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    for g, w in zip(got_grads, want_grads):
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() < 2e-2
    # saved for backward: x, g, u (and the (N, r) products); the reference also keeps h and silu(g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        lora_mlp(x, *projections)
    n = x.shape[0] * x.shape[1]
    assert sum(saved) <= n * (C + 2 * F + 3 * R) * 2 + 4 * 2**20
