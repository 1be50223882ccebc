"""Prompt tuning, prefix tuning and P-tuning train under TRL's SFTTrainer with a slimtune PeftModel.

SFTTrainer patches the forward of the model it is given and computes its loss from `model.base_model(...)`
hidden states (a fused LM head); slimtune's `base_model` applies the active prompt there, so the loss
trains the prompt. TRL's `peft_config=` accepts only HF peft's config classes: pass
`model=slimtune.get_peft_model(model, config)` instead (checked below, so a TRL change shows up here).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from datasets import Dataset
from prompt_cases import CASES

import slimtune
from tiny_models import TINY_MODELS, logits
from tiny_tokenizer import WORDS, tiny_tokenizer

trl = pytest.importorskip("trl")
LLAMA = TINY_MODELS["llama"]
METHODS = ["prompt", "prefix", "ptune_mlp"]


def _texts(n: int = 32) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(0, 12, (6,), generator=g)) + " the cat sat on the mat"
            for _ in range(n)]


def _model(case: str) -> slimtune.PeftModel:
    ours_cls, _, kwargs = CASES[case]
    torch.manual_seed(1)
    return slimtune.get_peft_model(LLAMA.model(), ours_cls(**kwargs, task_type="CAUSAL_LM"))


def _sft(model, out, **kwargs):
    args = trl.SFTConfig(output_dir=str(out), dataset_text_field="text", per_device_train_batch_size=8,
                         max_steps=24, learning_rate=0.1, logging_steps=1, save_strategy="no", report_to=[],
                         seed=0, use_cpu=True, max_length=32)
    return trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": _texts()}),
                          processing_class=tiny_tokenizer(), **kwargs)


@pytest.mark.parametrize("case", METHODS)
def test_prompt_methods_train_under_sft_trainer_and_load_in_peft(case, tmp_path):
    model = _model(case)
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    prompt_before = {k: v.clone() for k, v in model.prompt_encoder.state_dict().items()}
    trainer = _sft(model, tmp_path)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    # a few virtual tokens steer a tiny random model only a little: 0.02-0.15 over 24 steps (seeded, CPU-exact)
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.01, losses

    for key, value in model.get_base_model().state_dict().items():
        assert torch.equal(value, base_before[key]), f"{key}: the base model must stay frozen"
    changed = [k for k, v in model.prompt_encoder.state_dict().items() if not torch.equal(v, prompt_before[k])]
    assert changed == list(prompt_before), f"every prompt tensor trains; unchanged: {set(prompt_before) - set(changed)}"

    # SFTTrainer's fused loss (hidden states from model.base_model) is the PeftModel's own loss without the first
    # real token: TRL's unextended labels leave no slot for the virtual tokens' prediction of it
    # (virtual_tokens.py, Note: TRL's fused loss)
    tok = tiny_tokenizer()
    batch = tok(_texts(4), return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.eval()
    with torch.no_grad():
        fused = model(**batch, labels=labels, fused_lm_head=True)
        own = model(**batch, labels=labels.index_fill(1, torch.tensor([0]), -100)).loss
    assert fused.label_mask.sum() == labels[:, 1:].ne(-100).sum()
    torch.testing.assert_close(-fused.log_probs.sum() / fused.label_mask.sum(), own, rtol=1e-4, atol=1e-5)

    model.save_pretrained(tmp_path / "adapter")
    inputs = LLAMA.inputs()
    reference = _model(case)  # Trainer left bf16 autocast wrapped around model.forward: compare in fp32
    reference.load_state_dict(model.state_dict())
    expected = logits(reference.eval(), inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(LLAMA.model(), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(in_peft, inputs), expected, rtol=1e-5, atol=1e-5)
    in_ours = slimtune.PeftModel.from_pretrained(LLAMA.model(), tmp_path / "adapter")
    torch.testing.assert_close(logits(in_ours, inputs), expected, rtol=1e-5, atol=1e-5)


def test_base_model_call_applies_the_prompt_and_disable_adapter_removes_it():
    model = _model("prompt").eval()
    ids = LLAMA.inputs()["input_ids"]
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        plain = model.get_base_model().model(input_ids=ids).last_hidden_state
        with model.disable_adapter():
            disabled = model.base_model(input_ids=ids).last_hidden_state
    assert hidden.shape == plain.shape  # the virtual positions are cut: one row per real token
    assert not torch.allclose(hidden, plain)
    torch.testing.assert_close(disabled, plain, rtol=0, atol=0)


def test_peft_config_argument_needs_a_peft_model_instead():
    """TRL type-checks peft_config against HF peft's classes: the supported spelling is model=get_peft_model(...)."""
    config = CASES["prompt"][0](num_virtual_tokens=3, task_type="CAUSAL_LM")
    with pytest.raises(TypeError, match=r"peft_config.*must be a `peft\.PeftConfig` instance"):
        _sft(LLAMA.model(), "unused", peft_config=config)
