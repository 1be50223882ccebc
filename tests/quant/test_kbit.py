"""prepare_model_for_kbit_training: freezing, non-reentrant checkpointing, input grads, no upcast."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.quant import Linear4bit, prepare_model_for_kbit_training


def _tiny_llama(dtype: torch.dtype = torch.bfloat16) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype)


def test_freezes_everything_and_keeps_dtypes() -> None:
    model = _tiny_llama(torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    # Note: no upcasting (peft would turn the bf16 norms and embeddings into fp32).
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes


def test_enables_non_reentrant_checkpointing_and_input_grads() -> None:
    model = _tiny_llama(torch.float32)
    prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing
    assert model.config.use_cache is False
    # The checkpoint function is bound to use_reentrant=False.
    assert layer._gradient_checkpointing_func.keywords.get("use_reentrant") is False
    model.train()
    emb_out = model.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    assert emb_out.requires_grad  # enable_input_require_grads' hook
    # A trainable module after frozen embeddings still gets gradients through checkpointed layers.
    model.lm_head.weight.requires_grad_(True)
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_user_kwargs_and_opt_out() -> None:
    model = _tiny_llama(torch.float32)
    prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"preserve_rng_state": False})
    kw = model.model.layers[0]._gradient_checkpointing_func.keywords
    assert kw["use_reentrant"] is False and kw["preserve_rng_state"] is False

    plain = _tiny_llama(torch.float32)
    prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False)
    assert not plain.is_gradient_checkpointing
    assert not any(p.requires_grad for p in plain.parameters())


def test_works_on_a_model_with_linear4bit_layers() -> None:
    model = _tiny_llama(torch.float32)
    mlp = model.model.layers[0].mlp
    mlp.up_proj = Linear4bit.from_linear(mlp.up_proj, compute_dtype=torch.float32)
    prepare_model_for_kbit_training(model)
    assert mlp.up_proj.weight.dtype == torch.uint8 and not mlp.up_proj.weight.requires_grad


def test_plain_module_without_checkpointing_support_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="Sequential"):
        prepare_model_for_kbit_training(torch.nn.Sequential(torch.nn.Linear(2, 2)))
