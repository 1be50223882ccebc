"""The table-driven invariant suite: every (tiny model x LoRA config) case through the same checks,
with HF peft as the oracle (same seed -> same weights and outputs; files load both ways)."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import slimtune
from layer_invariants import (
    assert_files_load_both_ways,
    assert_merge_disable_unload,
    assert_same_as_peft,
    assert_step_leaves_base_untouched,
    case_kwargs,
    pair,
    perturb,
)
from tiny_models import TINY_MODELS, logits

CASES = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "lora_only_bias": dict(r=4, lora_alpha=16, bias="lora_only"),
    "all_bias": dict(r=4, lora_alpha=16, bias="all"),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "gaussian": dict(r=4, lora_alpha=8, init_lora_weights="gaussian"),
    "patterns": dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2, "c_proj": 2},
                     alpha_pattern={"q_proj": 3}),
}
MODELS = list(TINY_MODELS)


def _config(lib, model_name: str, case: str, **extra):
    return lib.LoraConfig(**case_kwargs(CASES, model_name, case, **extra))


def _pair(model_name: str, case: str, **extra):
    return pair(model_name, _config(slimtune, model_name, case, **extra), _config(peft, model_name, case, **extra))


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_adapter_as_peft(model_name, case):
    if case == "patterns" and model_name in ("t5", "bert_cls", "bloom"):
        pytest.skip("pattern names are llama/gpt2 module names")
    ours, theirs = _pair(model_name, case)
    # peft also writes the frozen original of a modules_to_save module under bias='all'; we need not
    theirs_sd = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items() if ".original_module." not in k}
    assert_same_as_peft(ours, theirs, theirs_sd, TINY_MODELS[model_name].inputs())


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("case", ["lora", "rslora", "dora", "lora_only_bias"])
def test_files_load_both_ways(model_name, case, tmp_path):
    ours, theirs = _pair(model_name, case)
    assert_files_load_both_ways(ours, theirs, model_name, tmp_path)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("case", ["lora", "dora", "all_bias"])
def test_merge_disable_unload_invariants(model_name, case):
    # bias='all' changes base biases in place, as in peft: disabling the adapter does not give the base back
    assert_merge_disable_unload(model_name, _config(slimtune, model_name, case), disable_is_base=case != "all_bias")


@pytest.mark.parametrize("model_name", MODELS)
def test_only_adapter_parameters_train_and_base_is_untouched(model_name):
    assert_step_leaves_base_untouched(model_name, _config(slimtune, model_name, "lora"), ".adapters.default.")


def test_unload_returns_base_outputs():
    tiny = TINY_MODELS["llama"]
    inputs = tiny.inputs()
    base_logits = logits(tiny.model(), inputs)
    model = slimtune.get_peft_model(tiny.model(), slimtune.LoraConfig(r=4, target_modules="all-linear"))
    perturb(model)
    torch.testing.assert_close(logits(model.unload(), inputs), base_logits)


def test_conv1d_and_modules_to_save_keys_match_peft(tmp_path):
    ours, theirs = _pair("bert_cls", "lora")
    assert sorted(ours.adapter_state_dict()) == sorted(peft.get_peft_model_state_dict(theirs))
    assert "base_model.model.classifier.weight" in ours.adapter_state_dict()
    ours.save_pretrained(tmp_path)
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == sorted(ours.adapter_state_dict())


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_are_built_on_the_base_weights_device(use_dora):
    """Adapters (and DoRA's magnitude, computed from the base weight) land on the base layer's device.

    A meta-device base stands in for a GPU one on CPU-only CI: DoRA's norm once mixed a CPU adapter
    with the base weight's device and failed on every CUDA model.
    """
    with torch.device("meta"):
        base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    model = slimtune.get_peft_model(base, slimtune.LoraConfig(r=2, target_modules=["0", "2"], use_dora=use_dora))
    trainable = {name: param.device.type for name, param in model.named_parameters() if param.requires_grad}
    assert len(trainable) == (6 if use_dora else 4)
    assert set(trainable.values()) == {"meta"}
