"""(IA)^3 through the table-driven invariant suite (every tiny model x config case), HF peft as the oracle:
same seed -> same vectors and outputs; files load both ways; merge == unmerged; disable == base; 4-bit base."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from torch import nn

import slimtune
from slimtune.methods.ia3 import DEFAULT_FEEDFORWARD, DEFAULT_TARGETS, IA3Config, IA3Layer
from slimtune.quant.linear4bit import Linear4bit
from tiny_models import TINY_MODELS, logits

CASES = {
    "default": dict(),  # per-architecture target_modules + feedforward_modules
    "random_init": dict(init_ia3_weights=False),
    "all_linear": dict(target_modules="all-linear", feedforward_modules=[], init_ia3_weights=False),
}
MODELS = list(TINY_MODELS)
TOL = dict(rtol=1e-4, atol=1e-5)


def _config(lib, model_name: str, case: str, **extra):
    kwargs = dict(CASES[case], task_type=TINY_MODELS[model_name].task_type, **extra)
    if TINY_MODELS[model_name].conv1d:
        kwargs["fan_in_fan_out"] = True
    return lib.IA3Config(**kwargs)


def _perturb(model: nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor away from its init so that the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _pair(model_name: str, case: str, **extra):
    tiny = TINY_MODELS[model_name]
    torch.manual_seed(1)
    ours = slimtune.get_peft_model(tiny.model(), _config(slimtune.methods.ia3, model_name, case, **extra))
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny.model(), _config(peft, model_name, case, **extra))
    return ours.eval(), theirs.eval()


def _file_key(name: str) -> str:
    return name.replace(".adapters.default.", ".").replace(".modules_to_save.default.", ".")


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_adapter_as_peft(model_name, case):
    ours, theirs = _pair(model_name, case)
    ours_sd = ours.adapter_state_dict()
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    assert sorted(ours_sd) == sorted(theirs_sd)
    assert any(k.endswith(".ia3_l") for k in ours_sd)
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], rtol=0, atol=0, msg=key)
    inputs = TINY_MODELS[model_name].inputs()
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=0, atol=0)
    ours_trainable = sorted(_file_key(n) for n, p in ours.named_parameters() if p.requires_grad)
    theirs_trainable = sorted(n.replace(".default", "").replace(".modules_to_save", "")
                              for n, p in theirs.named_parameters() if p.requires_grad)
    assert ours_trainable == theirs_trainable


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
    _perturb(ours)
    inputs = TINY_MODELS[model_name].inputs()
    expected = logits(ours, inputs)
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(written) <= set(peft.IA3Config.__dataclass_fields__), set(written) - set(peft.IA3Config.__dataclass_fields__)
    assert written["peft_type"] == "IA3" and written["target_modules"] and written["feedforward_modules"] is not None
    loaded_in_peft = peft.PeftModel.from_pretrained(TINY_MODELS[model_name].model(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded_in_peft, inputs), expected)

    _perturb(theirs, seed=11)
    expected = logits(theirs, inputs)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_in_ours = slimtune.PeftModel.from_pretrained(TINY_MODELS[model_name].model(), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(loaded_in_ours, inputs), expected)
    assert not any(p.requires_grad for p in loaded_in_ours.parameters()), "inference mode loads frozen"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("case", ["default", "all_linear"])
def test_merge_disable_unload_invariants(model_name, case):
    tiny = TINY_MODELS[model_name]
    inputs = tiny.inputs()
    base_logits = logits(tiny.model(), inputs)
    model = slimtune.get_peft_model(tiny.model(), _config(slimtune.methods.ia3, model_name, case)).eval()
    _perturb(model)
    adapted = logits(model, inputs)
    assert (adapted - base_logits).abs().max() > 1e-3, "the perturbed adapter must change the output"
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), base_logits)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, **TOL)
    with model.disable_adapter():  # a merged layer unmerges itself when disabled, as in peft
        torch.testing.assert_close(logits(model, inputs), base_logits, **TOL)
    model.merge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, **TOL)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, IA3Layer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), adapted, **TOL)


@pytest.mark.parametrize("model_name", MODELS)
def test_only_vectors_train_and_base_is_untouched(model_name):
    tiny = TINY_MODELS[model_name]
    base = tiny.model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = slimtune.get_peft_model(base, _config(slimtune.methods.ia3, model_name, "default"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".ia3_l") or ".modules_to_save.default." in n for n in trainable)
    model(**tiny.inputs()).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for key, value in model.unload().state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_default_tables_are_peft_tables():
    for model_type, targets in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.items():
        assert DEFAULT_TARGETS[model_type] == targets, model_type
    for model_type, ff in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.items():
        assert DEFAULT_FEEDFORWARD[model_type] == ff, model_type


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
    _perturb(model)
    _perturb(ref)
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
