"""The architecture table (slimtune/architectures.py) checked against what each field promises, on tiny
random transformers models of every listed model type that transformers has, and against peft's tables."""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path

import pytest
import torch
from peft.utils import constants as peft_constants
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import slimtune.architectures as architectures
from slimtune.architectures import ARCHITECTURES, Architecture, column, for_model_type
from slimtune.kernels import llama_fused
from slimtune.targeting import find_targets

TARGET_FIELDS = ("lora_targets", "ia3_targets", "ia3_feedforward", "adalora_targets")
PEFT_TABLES = {
    "lora_targets": peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "ia3_targets": peft_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    "ia3_feedforward": peft_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    "adalora_targets": peft_constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
}
# The table lists every model type these peft tables give a list for (not peft's regex defaults).
COVERS_PEFT = TARGET_FIELDS

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=0,
            eos_token_id=0, decoder_start_token_id=0)
# Sizes the shared names above do not reach; None leaves the config's own value (falcon derives head_dim).
EXTRA: dict[str, dict] = {
    "falcon": dict(head_dim=None),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "mixtral": dict(num_local_experts=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    **{t: dict(d_ff=64, d_kv=8, num_decoder_layers=1) for t in ("t5", "mt5", "umt5")},
    **{t: dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=64, decoder_ffn_dim=64) for t in ("bart", "mbart")},
    "opt": dict(ffn_dim=64),
    "llama4": dict(text_config=dict(TINY, num_local_experts=2, intermediate_size_mlp=64),
                   vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, image_size=32, patch_size=16,
                                      projector_input_dim=32, projector_output_dim=32, vision_output_dim=32)),
}
# Defaults that name no module of transformers' model of that type: (model type, field) -> why.
NAMES_NO_MODULE = {
    ("blip-2", "lora_targets"): "peft's list serves both language models BLIP-2 ships with (T5: q/v, OPT: "
                                "q_proj/v_proj); a tiny Blip2Model has the OPT one, so q matches nothing",
    ("mixtral", "ia3_targets"): "peft's w2: transformers 5 holds Mixtral's experts in one fused module",
    ("mixtral", "ia3_feedforward"): "peft's w2: transformers 5 holds Mixtral's experts in one fused module",
}


def _in_transformers(model_type: str) -> bool:
    return model_type in CONFIG_MAPPING_NAMES


@functools.cache
def _model(model_type: str, causal: bool) -> nn.Module:
    """A tiny random model of `model_type`: the causal LM, or the bare backbone (AutoModel)."""
    extra = EXTRA.get(model_type, {})
    sizes = extra if "text_config" in extra else {**TINY, **extra}  # a composite config: its parts' sizes
    kwargs = {k: v for k, v in sizes.items() if v is not None}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if causal else AutoModel
    return auto.from_config(config).eval()


def _ids(model: nn.Module) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(3, vocab, (2, 8), generator=torch.Generator().manual_seed(1))


def _skip_unless_in_transformers(model_type: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not _in_transformers(model_type), reason=f"transformers has no {model_type}")


def _types(flag: str) -> list:
    return [pytest.param(t, marks=_skip_unless_in_transformers(t)) for t in column(flag)]


# ---- the table itself ---------------------------------------------------------------------------------
def test_module_is_a_leaf():
    tree = ast.parse(Path(architectures.__file__).read_text(encoding="utf-8"))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] == "slimtune"]


def test_lookups():
    assert for_model_type("llama") is ARCHITECTURES["llama"]
    assert for_model_type(None) == for_model_type("no-such-model") == for_model_type(3) == Architecture()
    assert column("fused_prefix") == {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
    assert column("ia3_feedforward")["mt5"] == ()  # an empty default is a default
    assert "gemma4" not in column("lora_targets")  # peft's default there is a regex
    with pytest.raises(ValueError, match="no field 'lora'"):
        column("lora")


def test_feedforward_modules_are_targets():
    for model_type, feedforward in column("ia3_feedforward").items():
        assert set(feedforward) <= set(ARCHITECTURES[model_type].ia3_targets), model_type


@pytest.mark.parametrize("field", TARGET_FIELDS)
def test_defaults_are_peft_defaults(field):
    theirs = {t: v for t, v in PEFT_TABLES[field].items() if isinstance(v, list)}
    ours = column(field)
    shared = [t for t in ours if t in theirs]
    assert len(shared) >= 10
    assert {t: list(ours[t]) for t in shared} == {t: theirs[t] for t in shared}
    if field in COVERS_PEFT:
        assert set(theirs) <= set(ours)


# ---- each promise on a tiny model ----------------------------------------------------------------------
def _target_cases() -> list:
    cases = []
    for model_type, arch in ARCHITECTURES.items():
        for field in TARGET_FIELDS:
            if getattr(arch, field) is None:
                continue
            marks = [_skip_unless_in_transformers(model_type)]
            if (model_type, field) in NAMES_NO_MODULE:
                marks.append(pytest.mark.xfail(strict=True, reason=NAMES_NO_MODULE[model_type, field]))
            cases.append(pytest.param(model_type, field, marks=marks, id=f"{model_type}-{field}"))
    return cases


@pytest.mark.parametrize(("model_type", "field"), _target_cases())
def test_every_default_name_is_a_module(model_type, field):
    model = _model(model_type, causal=False)
    for name in getattr(ARCHITECTURES[model_type], field):
        assert find_targets(model, [name]), name  # raises when the name matches no module


@pytest.mark.parametrize("model_type", _types("plain_head"))
def test_plain_head_logits_are_the_head_of_the_last_hidden_state(model_type):
    model = _model(model_type, causal=True)
    ids = _ids(model)
    backbone = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        logits = model(ids).logits
        hidden = backbone(ids).last_hidden_state
        assert torch.equal(logits, model.get_output_embeddings()(hidden))


def test_a_capped_head_fails_the_plain_head_check():
    """gemma2 soft-caps its logits: the comparison above tells it apart, and the table leaves it out."""
    assert not for_model_type("gemma2").plain_head
    model = _model("gemma2", causal=True)
    ids = _ids(model)
    with torch.no_grad():
        logits = model(ids).logits
        hidden = getattr(model, model.base_model_prefix)(ids).last_hidden_state
        assert not torch.equal(logits, model.get_output_embeddings()(hidden))


@pytest.mark.parametrize("model_type", _types("mask_free"))
def test_mask_free_right_padding_needs_no_mask(model_type):
    model = _model(model_type, causal=True)
    assert model.config._attn_implementation == "sdpa"  # the only attention drop_right_padding_mask accepts
    ids = _ids(model)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding in the second row
    with torch.no_grad():
        masked = model(ids, attention_mask=mask).logits
        unmasked = model(ids).logits
    keep = mask.bool()
    torch.testing.assert_close(unmasked[keep], masked[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", _types("fused_prefix"))
def test_fused_prefix_names_the_three_fused_modules(model_type):
    prefix = ARCHITECTURES[model_type].fused_prefix
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    assert all(hasattr(modeling, f"{prefix}{part}") for part in ("RMSNorm", "Attention", "MLP"))
    model = _model(model_type, causal=True)
    kinds = {llama_fused._kind(m, model_type, llama_fused.KINDS) for m in model.modules()} - {None}
    assert kinds == set(llama_fused.KINDS)
