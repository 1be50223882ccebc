"""User mistakes get a ValueError/TypeError that says what, where, and what is allowed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import slimtune
from tiny_models import TINY_MODELS

LLAMA = TINY_MODELS["llama"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), r"r=0 must be a positive integer"),
    (dict(r=-2), r"r=-2 must be a positive integer"),
    (dict(lora_alpha=0), r"lora_alpha=0 must be > 0"),
    (dict(lora_dropout=1.0), r"lora_dropout=1.0 must be in \[0, 1\)"),
    (dict(lora_dropout=-0.1), r"lora_dropout=-0.1"),
    (dict(bias="some"), r"bias='some' is not valid; allowed: none, all, lora_only"),
    (dict(init_lora_weights="olora"), r"init_lora_weights='olora' is not valid"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]=0"),
    (dict(task_type="CAUSAL"), r"task_type='CAUSAL' is not valid; allowed: CAUSAL_LM"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        slimtune.LoraConfig(**kwargs)


def test_target_that_matches_nothing_lists_existing_names():
    with pytest.raises(ValueError, match=r"target_modules=\['qkv'\] matched no module.*q_proj.*v_proj"):
        slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(target_modules=["qkv"]))


def test_unsupported_layer_type_names_module_and_type():
    with pytest.raises(ValueError, match=r"input_layernorm.*LlamaRMSNorm.*supported layer types: nn.Linear"):
        slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(target_modules=["input_layernorm"]))


def test_unknown_architecture_without_targets_asks_for_target_modules():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"no default for model_type=None; set target_modules"):
        slimtune.get_peft_model(Tiny(), slimtune.LoraConfig())


def test_adapter_with_wrong_shapes_names_key_and_both_shapes(tmp_path):
    slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=4)).save_pretrained(tmp_path)
    other = TINY_MODELS["qwen2"].model()  # same module names, different rank layout is fine; change r instead
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(4, 32\) but the model expects \(8, 32\)"):
        slimtune.PeftModel.from_pretrained(other, tmp_path)


def test_adapter_for_a_different_model_names_unmatched_tensors(tmp_path):
    slimtune.get_peft_model(TINY_MODELS["gpt2"].model(), slimtune.LoraConfig(r=2, target_modules=["c_attn"],
                                                                             fan_in_fan_out=True)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"match no adapter module of this base model, e.g. .*c_attn"):
        slimtune.PeftModel.from_pretrained(LLAMA.model(), tmp_path)


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(ValueError, match=r"adapter_config.json: no adapter config found"):
        slimtune.PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON"):
        slimtune.PeftModel.from_pretrained(LLAMA.model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "rank": 4}))
    with pytest.raises(ValueError, match=r"unknown field 'rank' for LoraConfig; allowed: .*\br\b"):
        slimtune.PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_qalora": True}))
    with pytest.raises(ValueError, match=r"use_qalora.*not support"):
        slimtune.PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ValueError, match=r"missing 'peft_type'"):
        slimtune.PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"expected a JSON object"):
        slimtune.PeftConfig.from_pretrained(tmp_path)


def test_weights_are_never_unpickled(tmp_path):
    slimtune.LoraConfig(r=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"found adapter_model.bin: slimtune never unpickles"):
        slimtune.PeftModel.from_pretrained(LLAMA.model(), tmp_path)


def test_corrupt_weights_and_missing_tensors(tmp_path):
    model = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=2))
    model.save_pretrained(tmp_path)
    sd = model.adapter_state_dict()
    dropped = sorted(sd)[0]
    save_file({k: v.contiguous() for k, v in sd.items() if k != dropped}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 adapter tensor"):
        slimtune.PeftModel.from_pretrained(LLAMA.model(), tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        slimtune.PeftModel.from_pretrained(LLAMA.model(), tmp_path)


def test_peft_config_object_is_refused_with_a_hint():
    peft = pytest.importorskip("peft")
    with pytest.raises(TypeError, match=r"slimtune PeftConfig"):
        slimtune.get_peft_model(LLAMA.model(), peft.LoraConfig(r=2))


def test_adapter_name_errors():
    model = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"adapter 'nope' not found; adapters: \['default'\]"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match=r"already exists"):
        model.add_adapter("default", slimtune.LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"only adapter"):
        model.delete_adapter("default")
