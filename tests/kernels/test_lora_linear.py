"""Fused LoRA linear: values and gradients against the plain formula and against LoraLayer's plain path."""

import copy

import pytest
import torch
from torch import nn

from slimtune import LoraConfig, get_peft_model
from slimtune.kernels import set_fast_path
from slimtune.kernels.lora_linear import lora_linear, lora_linear_reference
from slimtune.methods.lora.layer import LoraLayer
from slimtune.quant.linear4bit import Linear4bit
from slimtune.quant_format.nf4 import quantize_4bit


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    set_fast_path("auto")


def _grads(out: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    g = torch.randn_like(out)
    return list(torch.autograd.grad(out, tensors, g))


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_grads_match_reference(four_bit, bias):
    torch.manual_seed(0)
    n, d_in, d_out, r, s = 10, 64, 48, 4, 0.7
    x = torch.randn(2, n // 2, d_in, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(d_out, d_in, dtype=torch.float64)
    state = None
    if four_bit:
        weight, state = quantize_4bit(weight.float(), "nf4", 64, True)
        state.dtype = torch.float64  # dequantize straight to x's dtype for an fp64 comparison
    a = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    bvec = torch.randn(d_out, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = [x, a, b] + ([bvec] if bias else [])
    torch.manual_seed(1)
    out = lora_linear(x, weight, a, b, s, bvec, state)
    got = _grads(out, *inputs)
    torch.manual_seed(1)
    ref = lora_linear_reference(x, weight, a, b, s, bvec, state)
    want = _grads(ref, *inputs)
    torch.testing.assert_close(out, ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_bf16_close_to_fp32_reference():
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    weight, a, b = torch.randn(48, 64) / 8, torch.randn(8, 64) / 8, torch.randn(48, 8) / 8
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = lora_linear(x.bfloat16(), weight.bfloat16(), a, b, 2.0)
    ref = lora_linear_reference(x, weight.bfloat16().float(), a, b, 2.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    ga = torch.autograd.grad(out.float().sum(), (a, b))
    gr = torch.autograd.grad(ref.sum(), (a, b))
    for g, w in zip(ga, gr):
        assert g.dtype == torch.float32
        assert (g - w).norm() / w.norm() < 1e-2


def test_frozen_weight_required():
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(torch.randn(2, 4), nn.Parameter(torch.randn(3, 4)), torch.randn(1, 4), torch.randn(3, 1), 1.0)


def _tiny_llama(four_bit: bool, dropout: float = 0.0, dora: bool = False,
                compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    if four_bit:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name != "lm_head":
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, Linear4bit.from_linear(module, compute_dtype=compute_dtype))
    model.requires_grad_(False)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=dora, init_lora_weights="gaussian",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    for layer in model.modules():  # B != 0 so the adapters matter
        if isinstance(layer, LoraLayer):
            nn.init.normal_(layer.adapters["default"].lora_B.weight, std=0.1)
            layer.set_active(["default"], trainable=True)  # see bench/training.py: Python 3.12 Protocols
    return model


def _loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("four_bit", [False, True])
def test_lora_layer_fast_path_matches_plain_path(four_bit):
    model = _tiny_llama(four_bit)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    set_fast_path("off")
    loss_plain, grads_plain = _loss_and_grads(model, ids)
    set_fast_path("on")
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert layer._fused_ok(torch.randn(1, 64))
    loss_fast, grads_fast = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-5, atol=1e-5)
    assert grads_fast.keys() == grads_plain.keys() and len(grads_fast) == 2 * 7 * 2
    for name in grads_plain:
        torch.testing.assert_close(grads_fast[name], grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["dropout", "dora", "two_adapters", "disabled"])
def test_unsupported_cases_take_plain_path(case):
    model = _tiny_llama(False, dropout=0.1 if case == "dropout" else 0.0, dora=case == "dora")
    model.train()
    set_fast_path("on")
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    x = torch.randn(1, 64)
    if case == "two_adapters":
        layer.add("other", copy.deepcopy(layer.adapters["default"]))
        layer.set_active(["default", "other"], trainable=True)
    if case == "disabled":
        layer.disabled = True
    assert not layer._fused_ok(x)
    # and the plain path still trains: finite loss, gradients on the adapters
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = layer.adapters["default"].lora_A.weight.grad
    assert torch.isfinite(loss) and (grad is None if case == "disabled" else grad.abs().sum() > 0)


def test_under_autocast_the_op_runs_in_the_autocast_dtype():
    """lora_linear under autocast == lora_linear on bf16-cast inputs (custom_fwd semantics), close to the
    plain autograd formula under the same autocast; fp32 adapters get fp32 gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64, requires_grad=True)
    weight, bias = torch.randn(48, 64) / 8, torch.randn(48)
    a, b = (torch.randn(8, 64) / 8).requires_grad_(True), (torch.randn(48, 8) / 8).requires_grad_(True)
    g = torch.randn(2, 16, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, weight, a, b, 2.0, bias)
        ref = lora_linear_reference(x, weight, a, b, 2.0, bias)
    got = torch.autograd.grad(out, (x, a, b), g.bfloat16())
    want = torch.autograd.grad(ref, (x, a, b), g.bfloat16())
    assert out.dtype == ref.dtype == torch.bfloat16
    exact = lora_linear(x.detach().bfloat16(), weight.bfloat16(), a, b, 2.0, bias.bfloat16())
    torch.testing.assert_close(out, exact, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert [t.dtype for t in got] == [torch.float32] * 3
    for gf, gr in zip(got, want):
        assert ((gf - gr).norm() / gr.norm()).item() < 1e-2


def _max_rel_error(grads: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(((grads[n].float() - w).norm() / w.norm()).item() for n, w in want.items())


@pytest.mark.parametrize("base", ["fp32", "bf16", "4bit"])
def test_lora_layer_fast_path_matches_plain_path_under_autocast(base):
    """The loop's setting: bf16 autocast, fp32 adapters; base weights fp32, bf16 or 4-bit (bf16 compute).

    Both paths round differently in bf16 (the plain one rounds x A^T, (x A^T) B^T and the sum; the fused
    one accumulates the LoRA term into the base output in fp32), so "within bf16 noise" is measured: each
    path's gradient error against an fp32 run of the same weights; the fused path's may not be larger
    than 1.5x the plain path's (on this 2-layer model both are ~8% for the deepest adapters).
    """
    model = _tiny_llama(base == "4bit", compute_dtype=torch.bfloat16)
    if base == "bf16":
        model.to(torch.bfloat16)
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.adapters.float()
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    set_fast_path("off")
    reference = copy.deepcopy(model) if base == "4bit" else copy.deepcopy(model).float()
    loss_fp32, grads_fp32 = _loss_and_grads(reference, ids)  # 4-bit: bf16 base matmuls, fp32 LoRA
    first = next(m for m in model.modules() if isinstance(m, LoraLayer))
    results = {}
    for mode in ("off", "on"):
        set_fast_path(mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert first._fused_ok(torch.randn(1, 64)) == (mode == "on")
            results[mode] = _loss_and_grads(model, ids)
    (loss_plain, grads_plain), (loss_fast, grads_fast) = results["off"], results["on"]
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss_fast, loss_fp32, rtol=1e-2, atol=1e-2)
    assert grads_fast.keys() == grads_plain.keys() == grads_fp32.keys() and len(grads_fast) == 2 * 7 * 2
    assert all(g.dtype == torch.float32 for g in grads_fast.values())
    noise = _max_rel_error(grads_plain, grads_fp32)
    assert 0 < noise < 0.15
    assert _max_rel_error(grads_fast, grads_fp32) <= 1.5 * noise
    assert _max_rel_error(grads_fast, grads_plain) <= 1.5 * noise


def test_auto_mode_is_off_on_cpu():
    set_fast_path("auto")
    layer = next(m for m in _tiny_llama(False).modules() if isinstance(m, LoraLayer))
    assert not layer._fused_ok(torch.randn(1, 64))
    with pytest.raises(ValueError, match="allowed"):
        set_fast_path("fast")


@pytest.mark.gpu
@pytest.mark.parametrize("four_bit", [False, True])
def test_gpu_fast_path_matches_plain_path_bf16(four_bit):
    """bf16 model, fp32 adapters. The plain path runs LoRA in fp32, the fused one in bf16, so each path's
    gradients are measured against an fp32 run of the same initial weights; the fused path's error may
    not exceed 1.5x the plain path's (a fixed bound of 6% failed at 6.3% for a 4-bit q_proj: the tiny
    model's gradients are ~5% bf16 noise either way)."""
    model = _tiny_llama(four_bit, compute_dtype=torch.bfloat16).to("cuda", torch.bfloat16)
    for layer in model.modules():  # adapters in fp32, as get_peft_model makes them on a bf16 model
        if isinstance(layer, LoraLayer):
            layer.adapters.float()
    ids = torch.randint(0, 96, (2, 33), generator=torch.Generator().manual_seed(0)).cuda()
    set_fast_path("off")
    loss_fp32, grads_fp32 = _loss_and_grads(_tiny_llama(four_bit, compute_dtype=torch.float32).cuda(), ids)
    loss_plain, grads_plain = _loss_and_grads(model, ids)
    set_fast_path("auto")
    first = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert first._fused_ok(torch.randn(1, 64, dtype=torch.bfloat16, device="cuda"))
    loss_fast, grads_fast = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss_fast.float(), loss_fp32, rtol=2e-2, atol=2e-2)
    assert grads_fast.keys() == grads_plain.keys() == grads_fp32.keys()
    noise = _max_rel_error(grads_plain, grads_fp32)
    assert 0 < noise < 0.15
    assert _max_rel_error(grads_fast, grads_fp32) <= 1.5 * noise
