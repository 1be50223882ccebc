"""The tutorial's LoRA example trains unchanged under transformers.Trainer and TRL's SFTTrainer."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import slimtune
from slimtune import LoraConfig, TaskType, get_peft_model
from tiny_models import TINY_MODELS, logits
from tiny_tokenizer import WORDS, tiny_tokenizer

BLOOM = TINY_MODELS["bloom"]


def _texts(n: int = 32) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(0, 12, (8,), generator=g)) + " the cat sat on the mat"
            for _ in range(n)]


def _tutorial_model():
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["query_key_value"], lora_dropout=0.05,
                        bias="none", task_type=TaskType.CAUSAL_LM)
    return get_peft_model(BLOOM.model(), config)


def _losses(trainer_state) -> list[float]:
    return [row["loss"] for row in trainer_state.log_history if "loss" in row]


def test_tutorial_lora_under_transformers_trainer(tmp_path):
    tok = tiny_tokenizer()
    data = Dataset.from_dict({"text": _texts()}).map(lambda r: tok(r["text"]), remove_columns=["text"])
    model = _tutorial_model()
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k
                   and ".adapters." not in k}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40,
                             learning_rate=1e-1, logging_steps=1, save_steps=20, report_to=[], seed=0,
                             use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    losses = _losses(trainer.state)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.08, losses

    after = model.get_base_model().state_dict()
    for key, value in base_before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)

    checkpoint = tmp_path / "checkpoint-40"
    saved = load_file(checkpoint / "model.safetensors")
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved), sorted(saved)[:5]
    n_adapter = sum(v.numel() for v in saved.values())
    assert n_adapter == model.get_nb_trainable_parameters()[0]

    inputs = BLOOM.inputs()
    model.eval()
    expected = logits(model, inputs)
    fresh = _tutorial_model()
    fresh.load_state_dict(saved)
    torch.testing.assert_close(logits(fresh.eval(), inputs), expected)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = slimtune.PeftModel.from_pretrained(BLOOM.model(), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, inputs), expected)


def test_tutorial_lora_under_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    tok = tiny_tokenizer()
    model = _tutorial_model()
    args = trl.SFTConfig(output_dir=str(tmp_path), dataset_text_field="text", per_device_train_batch_size=8,
                         max_steps=40, learning_rate=1e-1, logging_steps=1, save_steps=40, report_to=[],
                         seed=0, use_cpu=True, max_length=32)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": _texts()}),
                             processing_class=tok)
    trainer.train()
    losses = _losses(trainer.state)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.08, losses
    saved = load_file(tmp_path / "checkpoint-40" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)
