"""(IA)^3 through the table-driven invariant suite (every tiny model x config case), HF peft as the oracle:
same seed -> same vectors and outputs; files load both ways; merge == unmerged; disable == base; 4-bit base."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn

import slimtune
from layer_invariants import (
    TOL,
    assert_files_load_both_ways,
    assert_merge_disable_unload,
    assert_same_as_peft,
    assert_step_leaves_base_untouched,
    case_kwargs,
    pair,
    perturb,
)
from slimtune.methods.ia3 import IA3Config
from slimtune.quant.linear4bit import Linear4bit
from tiny_models import TINY_MODELS, logits

CASES = {
    "default": dict(),  # per-architecture target_modules + feedforward_modules
    "random_init": dict(init_ia3_weights=False),
    "all_linear": dict(target_modules="all-linear", feedforward_modules=[], init_ia3_weights=False),
}
MODELS = list(TINY_MODELS)
SCALE = 0.3  # perturb() noise of this suite (the LoRA and AdaLoRA suites use the default 0.1)


def _config(lib, model_name: str, case: str, **extra):
    return lib.IA3Config(**case_kwargs(CASES, model_name, case, **extra))


def _pair(model_name: str, case: str, **extra):
    return pair(model_name, _config(slimtune.methods.ia3, model_name, case, **extra),
                _config(peft, model_name, case, **extra))


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_adapter_as_peft(model_name, case):
    ours, theirs = _pair(model_name, case)
    assert_same_as_peft(ours, theirs, peft.get_peft_model_state_dict(theirs), TINY_MODELS[model_name].inputs(),
                        rtol=0, atol=0)
    assert any(k.endswith(".ia3_l") for k in ours.adapter_state_dict())


@pytest.mark.parametrize("model_name", MODELS)
def test_feedforward_vectors_scale_inputs_like_peft(model_name):
    """Shapes tell input (1, in) from output (out, 1) vectors; they must agree with peft's choice per module."""
    ours, theirs = _pair(model_name, "default")
    ours_sd, theirs_sd = ours.adapter_state_dict(), peft.get_peft_model_state_dict(theirs)
    shapes = {k: tuple(v.shape) for k, v in ours_sd.items() if k.endswith("ia3_l")}
    assert shapes == {k: tuple(v.shape) for k, v in theirs_sd.items() if k.endswith("ia3_l")}
    assert any(s[0] == 1 for s in shapes.values()) and any(s[1] == 1 for s in shapes.values()), shapes


@pytest.mark.parametrize("model_name", MODELS)
def test_files_load_both_ways(model_name, tmp_path):
    ours, theirs = _pair(model_name, "default")
    written = assert_files_load_both_ways(ours, theirs, model_name, tmp_path, scale=SCALE)
    assert written["peft_type"] == "IA3" and written["target_modules"] and written["feedforward_modules"] is not None


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("case", ["default", "all_linear"])
def test_merge_disable_unload_invariants(model_name, case):
    assert_merge_disable_unload(model_name, _config(slimtune.methods.ia3, model_name, case), scale=SCALE)


@pytest.mark.parametrize("model_name", MODELS)
def test_only_vectors_train_and_base_is_untouched(model_name):
    grads = assert_step_leaves_base_untouched(model_name, _config(slimtune.methods.ia3, model_name, "default"),
                                              ".adapters.default.ia3_l")
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_peft_config_files_load_and_ours_round_trip():
    theirs = peft.IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"], task_type="SEQ_2_SEQ_LM")
    data = json.loads(json.dumps(theirs.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    ours = slimtune.PeftConfig.from_dict(data)
    assert isinstance(ours, IA3Config)
    assert ours.target_modules == ["k", "v", "wo"] and ours.feedforward_modules == ["wo"]
    assert IA3Config.from_dict(ours.to_dict()) == ours
    with pytest.raises(ValueError, match="unknown field 'r'"):
        IA3Config.from_dict({**ours.to_dict(), "r": 8})


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), r"subset of target_modules.*'down_proj'"),
    (dict(init_ia3_weights="ones"), "init_ia3_weights='ones'"),
    (dict(target_modules=3), "target_modules=3"),
])
def test_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IA3Config(**kwargs)


def test_unsupported_module_and_unknown_architecture_are_clear_errors():
    with pytest.raises(ValueError, match="IA3 cannot adapt module 'model.embed_tokens' of type Embedding"):
        slimtune.get_peft_model(TINY_MODELS["llama"].model(), IA3Config(target_modules=["embed_tokens"],
                                                                        feedforward_modules=[]))
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no default for model_type=None"):
        slimtune.get_peft_model(Plain(), IA3Config())
    with pytest.raises(ValueError, match="feedforward_modules is not set"):
        slimtune.get_peft_model(Plain(), IA3Config(target_modules=["fc"]))
    model = slimtune.get_peft_model(Plain(), IA3Config(target_modules=["fc"], feedforward_modules=["fc"]))
    assert tuple(model.adapter_state_dict()["base_model.model.fc.ia3_l"].shape) == (1, 4)


# ---- 4-bit base -------------------------------------------------------------------------------
def _quantize_targets(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    for name, module in list(model.named_modules()):
        if name.split(".")[-1] in names and isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit.from_linear(module, compute_dtype=torch.float32))
    return model


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every Linear4bit replaced by the float nn.Linear it stands for."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight.data.copy_(module.dequantize())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
    return model


def test_ia3_on_4bit_base_matches_float_reference_and_unloads_to_linear():
    tiny = TINY_MODELS["llama"]
    inputs = tiny.inputs()
    targets = ("k_proj", "v_proj", "down_proj")
    q_base = _quantize_targets(tiny.model(), targets)
    ref = slimtune.get_peft_model(_dequantized_copy(_quantize_targets(tiny.model(), targets)), IA3Config()).eval()
    model = slimtune.get_peft_model(q_base, IA3Config()).eval()
    assert isinstance(model.base_model.model.model.layers[0].mlp.down_proj.base_layer, Linear4bit)
    perturb(model, scale=SCALE)
    perturb(ref, scale=SCALE)
    expected = logits(ref, inputs)
    torch.testing.assert_close(logits(model, inputs), expected, **TOL)
    with model.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), logits(ref, inputs), **TOL)
    # training reaches the vectors through the 4-bit matmul
    model.train()
    model(**inputs).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with pytest.raises(ValueError, match="cannot merge .* 4-bit"):
        model.merge_adapter()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    assert isinstance(merged.model.layers[0].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(logits(merged, inputs), expected, **TOL)


def test_bf16_base_gets_fp32_vectors_like_peft():
    tiny = TINY_MODELS["llama"]
    config = IA3Config()
    ours = slimtune.get_peft_model(tiny.model().to(torch.bfloat16), config)
    theirs = peft.get_peft_model(tiny.model().to(torch.bfloat16), peft.IA3Config())
    assert {v.dtype for v in ours.adapter_state_dict().values()} == {torch.float32}
    assert {v.dtype for v in peft.get_peft_model_state_dict(theirs).values()} == {torch.float32}
    assert config.target_modules is None  # defaults fill the model's copy, never the user's object
    assert ours.peft_config["default"].target_modules == ["k_proj", "v_proj", "down_proj"]


def test_several_adapters_switch_and_delete():
    tiny = TINY_MODELS["llama"]
    inputs = tiny.inputs()
    model = slimtune.get_peft_model(tiny.model(), IA3Config(init_ia3_weights=False)).eval()
    first = logits(model, inputs)
    model.add_adapter("other", IA3Config(target_modules=["v_proj"], feedforward_modules=[], init_ia3_weights=False))
    torch.testing.assert_close(logits(model, inputs), first)  # a new adapter stays inactive
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    model.set_adapter("other")
    second = logits(model, inputs)
    assert (second - first).abs().max() > 1e-3
    assert all(".other." in n for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(model.adapter_state_dict("other")) == [f"base_model.model.model.layers.{i}.self_attn.v_proj.ia3_l"
                                                         for i in range(2)]
    model.delete_adapter("default")
    torch.testing.assert_close(logits(model, inputs), second)
    assert not any(".default." in n for n, _ in model.named_parameters())
