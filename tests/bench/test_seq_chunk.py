"""bench/seq_chunk.py, sequence-chunked MLP recompute for long context: same loss and LoRA gradients as the
plain MLP, with gradient checkpointing and checkpoint offload on, and fewer positions per MLP call."""

from __future__ import annotations

import pytest
import torch
from tiny_run import build_llama

from slimtune.bench.seq_chunk import SequenceChunkedMLP, chunk_mlps
from slimtune.train.methods import build_peft_config, prepare_model, trainable_parameters
from slimtune.train.offload import offload_saved_tensors
from slimtune.train.rng import seed_everything


def _lora_llama() -> torch.nn.Module:
    seed_everything(0)
    peft = build_peft_config("lora", {"r": 4, "target_modules": "all-linear", "init_lora_weights": False})
    return prepare_model(build_llama(None), "lora", peft, gradient_checkpointing=True)


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    with offload_saved_tensors(min_bytes=0):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in trainable_parameters(model).items()}


def test_chunked_mlp_equals_plain_mlp_values_and_grads() -> None:
    ids = torch.randint(3, 320, (2, 37), generator=torch.Generator().manual_seed(0))
    loss_ref, grads_ref = _loss_and_grads(_lora_llama(), ids)
    model = _lora_llama()
    assert chunk_mlps(model, chunk=8) == 2 and chunk_mlps(model, chunk=8) == 0  # once per layer
    calls: list[int] = []
    for m in model.modules():
        if isinstance(m, SequenceChunkedMLP):
            m.mlp.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[1]))
    loss, grads = _loss_and_grads(model, ids)
    assert max(calls) == 8 and sum(calls) >= 2 * 2 * 37  # per layer: forward, then each chunk again in backward
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    assert [k.replace("mlp.mlp.", "mlp.") for k in grads] == list(grads_ref) and len(grads) == 28
    for (name, g), got in zip(grads_ref.items(), grads.values()):
        assert got.abs().max() > 0, name
        torch.testing.assert_close(got, g, atol=1e-6, rtol=1e-5, msg=name)


def test_short_inputs_and_inference_and_bad_chunk() -> None:
    mlp = torch.nn.Linear(4, 3)
    x = torch.randn(1, 10, 4)
    with torch.no_grad():
        torch.testing.assert_close(SequenceChunkedMLP(mlp, 3)(x), mlp(x))
        torch.testing.assert_close(SequenceChunkedMLP(mlp, 16)(x), mlp(x))
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        SequenceChunkedMLP(mlp, 0)
