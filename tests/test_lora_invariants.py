"""The table-driven invariant suite: every (tiny model x LoRA config) case through the same checks,
with HF peft as the oracle (same seed -> same weights and outputs; files load both ways)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import slimtune
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
    kwargs = dict(CASES[case], task_type=TINY_MODELS[model_name].task_type, **extra)
    if TINY_MODELS[model_name].conv1d:
        kwargs["fan_in_fan_out"] = True
    return lib.LoraConfig(**kwargs)


def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Give every trainable tensor a random value so that B != 0 and outputs differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _pair(model_name: str, case: str, **extra):
    """(slimtune model, peft model) built from the same base weights with the same seed."""
    tiny = TINY_MODELS[model_name]
    torch.manual_seed(1)
    ours = slimtune.get_peft_model(tiny.model(), _config(slimtune, model_name, case, **extra))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny.model(), _config(peft, model_name, case, **extra))
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_adapter_as_peft(model_name, case):
    if case == "patterns" and model_name in ("t5", "bert_cls", "bloom"):
        pytest.skip("pattern names are llama/gpt2 module names")
    ours, theirs = _pair(model_name, case)
    ours_sd = ours.adapter_state_dict()
    # peft also writes the frozen original of a modules_to_save module under bias='all'; we need not
    theirs_sd = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items() if ".original_module." not in k}
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], rtol=0, atol=0, msg=key)
    inputs = TINY_MODELS[model_name].inputs()
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs))
    ours_trainable = sorted(n.replace(".adapters.default.", ".").replace(".modules_to_save.default.", ".")
                            for n, p in ours.named_parameters() if p.requires_grad)
    theirs_trainable = sorted(n.replace(".default", "").replace(".modules_to_save", "")
                              .replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
                              for n, p in theirs.named_parameters() if p.requires_grad)
    assert ours_trainable == theirs_trainable


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("case", ["lora", "rslora", "dora", "lora_only_bias"])
def test_files_load_both_ways(model_name, case, tmp_path):
    ours, theirs = _pair(model_name, case)
    _perturb(ours)
    inputs = TINY_MODELS[model_name].inputs()
    expected = logits(ours, inputs)
    ours.save_pretrained(tmp_path / "ours")
    loaded_in_peft = peft.PeftModel.from_pretrained(TINY_MODELS[model_name].model(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded_in_peft, inputs), expected)
    # peft's config object accepts every field we wrote
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_fields = set(peft.LoraConfig.__dataclass_fields__)
    assert set(written) <= peft_fields, set(written) - peft_fields

    _perturb(theirs, seed=11)
    expected = logits(theirs, inputs)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_in_ours = slimtune.PeftModel.from_pretrained(TINY_MODELS[model_name].model(), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(loaded_in_ours, inputs), expected)
    assert not any(p.requires_grad for p in loaded_in_ours.parameters()), "inference mode loads frozen"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("case", ["lora", "dora", "all_bias"])
def test_merge_disable_unload_invariants(model_name, case):
    tiny = TINY_MODELS[model_name]
    inputs = tiny.inputs()
    base_logits = logits(tiny.model(), inputs)
    model = slimtune.get_peft_model(tiny.model(), _config(slimtune, model_name, case)).eval()
    _perturb(model)
    adapted = logits(model, inputs)
    assert (adapted - base_logits).abs().max() > 1e-3, "the perturbed adapter must change the output"
    if case != "all_bias":  # bias='all' changes base biases in place, as in peft
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, inputs), base_logits)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-4, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any("adapters" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(logits(merged, inputs), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_only_adapter_parameters_train_and_base_is_untouched(model_name):
    tiny = TINY_MODELS[model_name]
    base = tiny.model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = slimtune.get_peft_model(base, _config(slimtune, model_name, "lora"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n or ".modules_to_save.default." in n for n in trainable)
    inputs = tiny.inputs()
    out = model(**inputs).logits
    out.float().pow(2).mean().backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    unloaded = model.unload()
    for key, value in unloaded.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_unload_returns_base_outputs():
    tiny = TINY_MODELS["llama"]
    inputs = tiny.inputs()
    base_logits = logits(tiny.model(), inputs)
    model = slimtune.get_peft_model(tiny.model(), slimtune.LoraConfig(r=4, target_modules="all-linear"))
    _perturb(model)
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
