"""LoRA features beyond the invariant table: embeddings, PiSSA, layer filters, several adapters."""

from __future__ import annotations

import peft
import pytest
import torch

import slimtune
from tiny_models import TINY_MODELS, logits

LLAMA = TINY_MODELS["llama"]


def _both(**kwargs):
    torch.manual_seed(3)
    ours = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(**kwargs)).eval()
    torch.manual_seed(3)
    theirs = peft.get_peft_model(LLAMA.model(), peft.LoraConfig(**kwargs)).eval()
    return ours, theirs


@pytest.mark.parametrize("kwargs", [
    dict(r=4, target_modules=["embed_tokens", "q_proj"]),
    dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    dict(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights="pissa"),
    dict(r=2, target_modules=["down_proj"], init_lora_weights="pissa_niter_4"),
    dict(r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    dict(r=4, target_modules=r".*\.1\.self_attn\.(q|k)_proj"),
    dict(r=4, target_modules="all-linear", exclude_modules=["o_proj", "down_proj"]),
])
def test_feature_matches_peft(kwargs):
    ours, theirs = _both(**kwargs)
    theirs_sd = peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)
    ours_sd = ours.adapter_state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], msg=key)
    inputs = LLAMA.inputs()
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs))


def test_layers_to_transform_keeps_only_listed_blocks():
    model = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=2, target_modules="all-linear",
                                                                      layers_to_transform=1))
    adapted = {n for n, m in model.named_modules() if isinstance(m, slimtune.methods.lora.LoraLayer)}
    assert adapted and all(".layers.1." in n for n in adapted)


def test_embedding_adapter_round_trip(tmp_path):
    model = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=4, target_modules=["embed_tokens"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    inputs = LLAMA.inputs()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    in_peft = peft.PeftModel.from_pretrained(LLAMA.model(), tmp_path)
    torch.testing.assert_close(logits(in_peft, inputs), expected)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-4, atol=1e-5)


def test_several_adapters_switch_save_load_delete(tmp_path):
    inputs = LLAMA.inputs()
    model = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      init_lora_weights=False))
    model.add_adapter("other", slimtune.LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False))
    first = logits(model, inputs)
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    model.set_adapter("other")
    second = logits(model, inputs)
    assert not torch.allclose(first, second)
    assert all(".adapters.other." in n for n, p in model.named_parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_config.json").is_file()

    reloaded = slimtune.PeftModel.from_pretrained(LLAMA.model(), tmp_path)
    torch.testing.assert_close(logits(reloaded, inputs), first)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(logits(reloaded, inputs), first)  # loading does not switch
    reloaded.set_adapter("other")
    torch.testing.assert_close(logits(reloaded, inputs), second)
    reloaded.delete_adapter("other")
    assert reloaded.active_adapter == "default" and list(reloaded.peft_config) == ["default"]
    torch.testing.assert_close(logits(reloaded, inputs), first)
    assert not any(".other." in n for n in reloaded.state_dict())


def test_peft_multi_adapter_folder_loads_in_slimtune(tmp_path):
    inputs = LLAMA.inputs()
    theirs = peft.get_peft_model(LLAMA.model(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    theirs.add_adapter("b", peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    theirs.set_adapter("b")
    expected = logits(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = slimtune.PeftModel.from_pretrained(LLAMA.model(), tmp_path, subfolder="b", adapter_name="b")
    torch.testing.assert_close(logits(ours, inputs), expected)


def test_trainable_and_total_parameter_counts_match_peft(capsys):
    ours, theirs = _both(r=4, target_modules="all-linear")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    assert "trainable params:" in capsys.readouterr().out


def test_trainer_style_state_dict_round_trip():
    model = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=2, init_lora_weights=False))
    sd = model.state_dict()
    assert all("lora_" in k for k in sd) and sd
    other = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=2))
    other.load_state_dict(sd)
    inputs = LLAMA.inputs()
    torch.testing.assert_close(logits(other, inputs), logits(model, inputs))


def test_forward_and_generate_pass_through():
    model = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=2))
    ids = LLAMA.inputs(batch=1)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 3)
    assert model.config is model.get_base_model().config


def test_second_all_linear_adapter_wraps_only_base_layers(tmp_path):
    model = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=2, target_modules="all-linear"))
    model.add_adapter("second", slimtune.LoraConfig(r=2, target_modules="all-linear"))
    layers = [n for n, m in model.named_modules() if isinstance(m, slimtune.methods.lora.LoraLayer)]
    assert len(layers) == 14 and not any(".adapters." in n for n in layers)
    model.save_pretrained(tmp_path)
    reloaded = slimtune.PeftModel.from_pretrained(LLAMA.model(), tmp_path)
    reloaded.load_adapter(tmp_path / "second", adapter_name="second")
    assert sorted(reloaded.peft_config) == ["default", "second"]


def test_adapter_layers_are_recognised_without_protocol_isinstance():
    """Python 3.12's runtime Protocol check reads attributes statically and misses nn.Module children;
    recognition must not depend on it (else set_adapter leaves adapters frozen on 3.12)."""
    import inspect

    from slimtune.adapter_layer import is_adapter_layer

    model = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=2))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with pytest.raises(AttributeError):
        inspect.getattr_static(layer, "base_layer")
    assert is_adapter_layer(layer) and not is_adapter_layer(layer.base_layer)
    assert any(p.requires_grad for p in layer.adapters.parameters())
