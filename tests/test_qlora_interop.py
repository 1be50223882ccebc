"""QLoRA across libraries: a LoRA adapter trained on a slimtune 4-bit model loads in HF peft on a
transformers + bitsandbytes 4-bit model with the same logits, and back; merge_and_unload dequantizes."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import slimtune
from slimtune.peft_model import count_parameters
from slimtune.quant import Linear4bit, load_model

pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 77, 3, 120, 42, 8], [4, 4, 100, 2, 9, 18, 60, 7]])
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    return path


def _bnb(path: Path) -> nn.Module:
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32, device_map="cpu")


def _logits(model: nn.Module) -> torch.Tensor:
    # bitsandbytes' CPU Linear4bit takes a bf16 fast path in eval mode and repacks its weight for good;
    # train mode (no dropout anywhere here) keeps the dequantize + matmul path we compare against.
    model.train()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_slimtune_qlora_adapter_loads_in_peft_on_bitsandbytes(checkpoint, tmp_path):
    ours = slimtune.get_peft_model(load_model(checkpoint, quantization="nf4", compute_dtype=torch.float32,
                                              device="cpu"), slimtune.LoraConfig(**LORA))
    assert sum(isinstance(m.base_layer, Linear4bit) for m in ours.modules() if hasattr(m, "adapters")) == 14
    _perturb(ours)
    expected = _logits(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_bnb(checkpoint), tmp_path)
    torch.testing.assert_close(_logits(theirs), expected, rtol=1e-5, atol=1e-5)


def test_peft_qlora_adapter_loads_in_slimtune(checkpoint, tmp_path):
    theirs = peft.get_peft_model(_bnb(checkpoint), peft.LoraConfig(**LORA))
    _perturb(theirs)
    expected = _logits(theirs)
    theirs.save_pretrained(tmp_path)
    ours = slimtune.PeftModel.from_pretrained(load_model(checkpoint, quantization="nf4",
                                                         compute_dtype=torch.float32, device="cpu"), tmp_path)
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_dequantizes_and_never_requantizes(checkpoint):
    model = slimtune.get_peft_model(load_model(checkpoint, quantization="nf4", compute_dtype=torch.float32,
                                               device="cpu"), slimtune.LoraConfig(**LORA))
    _perturb(model)
    expected = _logits(model)
    with pytest.raises(ValueError, match="cannot merge into a 4-bit layer without re-quantizing"):
        model.merge_adapter()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-5)


def test_qlora_trains_only_the_adapter(checkpoint):
    model = slimtune.prepare_model_for_kbit_training(
        load_model(checkpoint, quantization="nf4", compute_dtype=torch.float32, device="cpu"))
    model = slimtune.get_peft_model(model, slimtune.LoraConfig(**LORA))
    packed_before = [b.clone() for m in model.modules() if isinstance(m, Linear4bit) for b in m.buffers()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    packed_after = [b for m in model.modules() if isinstance(m, Linear4bit) for b in m.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(packed_before, packed_after))


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_trainable_parameter_count_matches_peft_on_bitsandbytes(checkpoint, storage):
    theirs = peft.get_peft_model(_bnb(checkpoint), peft.LoraConfig(**LORA)).get_nb_trainable_parameters()
    ours = slimtune.get_peft_model(load_model(checkpoint, quantization="nf4", compute_dtype=torch.float32,
                                              device="cpu"), slimtune.LoraConfig(**LORA))
    for m in ours.modules():
        if isinstance(m, Linear4bit):
            m.set_quant_storage(storage)
    assert ours.get_nb_trainable_parameters() == theirs
    plain = slimtune.get_peft_model(load_model(checkpoint, quantization=None, compute_dtype=torch.float32,
                                               device="cpu"), slimtune.LoraConfig(**LORA))
    assert count_parameters(ours) == count_parameters(plain) == theirs  # 4-bit total = unquantized total
