"""load_model / save_quantized on a tiny random Llama, against transformers + bitsandbytes on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtune.quant import Linear4bit, load_model, save_quantized, update_quantization_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.tensor([[1, 5, 9, 77, 3, 120, 42, 8]])


def _save_tiny(path: Path, tie: bool = False, bias: bool = False, shard: str | None = None) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, attention_bias=bias,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if bias:
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                nn.init.normal_(p, std=0.1)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def _bnb_model(path: Path, quant_type: str = "nf4", double_quant: bool = True) -> nn.Module:
    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=cfg, dtype=torch.float32, device_map="cpu"
    )


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _bnb_logits(model: nn.Module) -> torch.Tensor:
    """Logits of a transformers + bitsandbytes model through its dequantize + matmul path.

    Note: bitsandbytes' CPU fast path
    In eval mode with inputs that need no grad, bitsandbytes' CPU Linear4bit repacks its weight
    (in place, for good) and runs a fused AVX512-bf16 kernel that computes in bf16 whatever the
    compute dtype; train mode (Llama has no dropout) keeps the reference path we mirror.
    """
    model.train()
    return model(input_ids=IDS).logits.detach()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_quantized_load_matches_transformers_bitsandbytes(
    tiny: Path, quant_type: str, double_quant: bool
) -> None:
    ours = load_model(tiny, quant_type, double_quant, compute_dtype=torch.float32, device="cpu")
    ref = _bnb_model(tiny, quant_type, double_quant)
    for layer in ours.model.layers:
        for name in PROJECTIONS:
            module = layer.get_submodule(
                f"self_attn.{name}" if "proj" in name and name[0] in "qkvo" else f"mlp.{name}"
            )
            assert isinstance(module, Linear4bit) and module.quant_state.quant_type == quant_type
    assert type(ours.lm_head) is nn.Linear and ours.lm_head.weight.dtype == torch.float32
    # Same packed bytes and scales as bitsandbytes' own quantization of the same weights.
    ref_sd = ref.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, ref_sd[key]), key
    torch.testing.assert_close(_logits(ours), _bnb_logits(ref), rtol=0, atol=0)
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])


def test_rotary_buffers_and_plain_load(tiny: Path) -> None:
    plain = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ours = load_model(tiny, quantization=None, compute_dtype=torch.float32, device="cpu")
    assert not any(isinstance(m, Linear4bit) for m in ours.modules())
    assert torch.equal(ours.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    torch.testing.assert_close(_logits(ours), _logits(plain), rtol=0, atol=0)


def test_loads_a_bitsandbytes_saved_checkpoint(tiny: Path, tmp_path: Path) -> None:
    ref = _bnb_model(tiny)
    ref.save_pretrained(tmp_path / "bnb4")
    ours = load_model(tmp_path / "bnb4", compute_dtype=torch.float32, device="cpu")
    assert isinstance(ours.model.layers[1].mlp.down_proj, Linear4bit)
    torch.testing.assert_close(_logits(ours), _bnb_logits(ref), rtol=0, atol=0)


def test_saved_checkpoint_loads_in_transformers_bitsandbytes(tiny: Path, tmp_path: Path) -> None:
    ours = load_model(tiny, compute_dtype=torch.float32, device="cpu")
    save_quantized(ours, tmp_path / "ours4")
    qc = json.loads((tmp_path / "ours4" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ours4", device_map="cpu")
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert type(theirs.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    torch.testing.assert_close(_bnb_logits(theirs), _logits(ours), rtol=0, atol=0)
    # And back into ours, unchanged.
    again = load_model(tmp_path / "ours4", compute_dtype=torch.float32, device="cpu")
    torch.testing.assert_close(_logits(again), _logits(ours), rtol=0, atol=0)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_save_pretrained_loads_in_transformers_bitsandbytes(
    tiny: Path, tmp_path: Path, quant_type: str, double_quant: bool
) -> None:
    ours = load_model(tiny, quant_type, double_quant, compute_dtype=torch.float32, device="cpu")
    ours.save_pretrained(tmp_path / "pretrained")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained", device_map="cpu")
    up = theirs.model.layers[0].mlp.up_proj
    assert type(up).__module__.startswith("bitsandbytes") and up.weight.quant_state.quant_type == quant_type
    torch.testing.assert_close(_bnb_logits(theirs), _logits(ours), rtol=0, atol=0)
    # The same files as save_quantized writes, and back into ours unchanged.
    save_quantized(ours, tmp_path / "quantized")
    _assert_same_checkpoint(tmp_path / "pretrained", tmp_path / "quantized")
    again = load_model(tmp_path / "pretrained", compute_dtype=torch.float32, device="cpu")
    torch.testing.assert_close(_logits(again), _logits(ours), rtol=0, atol=0)


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    for key, value in ta.items():
        assert value.dtype == tb[key].dtype and torch.equal(value, tb[key]), key


def test_plain_model_config_stays_plain(tiny: Path, tmp_path: Path) -> None:
    plain = load_model(tiny, quantization=None, compute_dtype=torch.float32, device="cpu")
    assert not hasattr(plain.config, "quantization_config")
    plain.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_quantization_config_follows_dequantized_layers(tiny: Path, tmp_path: Path) -> None:
    ours = load_model(tiny, compute_dtype=torch.float32, device="cpu")
    assert ours.config.quantization_config["llm_int8_skip_modules"] == ["lm_head"]
    _dequantize(ours, "model.layers.1.mlp.down_proj")
    update_quantization_config(ours)
    skips = ours.config.quantization_config["llm_int8_skip_modules"]
    assert skips == ["model.layers.1.mlp.down_proj", "lm_head"]
    ours.save_pretrained(tmp_path / "mixed")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed", device_map="cpu")
    assert type(theirs.model.layers[1].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(_bnb_logits(theirs), _logits(ours), rtol=0, atol=0)
    for name in [n for n, m in ours.named_modules() if isinstance(m, Linear4bit)]:
        _dequantize(ours, name)
    update_quantization_config(ours)
    assert not hasattr(ours.config, "quantization_config")


def test_merged_4bit_model_saves_as_a_plain_model(tiny: Path, tmp_path: Path) -> None:
    from slimtune import LoraConfig, get_peft_model

    ours = get_peft_model(load_model(tiny, compute_dtype=torch.float32, device="cpu"),
                          LoraConfig(r=2, target_modules="all-linear", init_lora_weights="gaussian"))
    want = _logits(ours)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    assert not hasattr(merged.config, "quantization_config")
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(_logits(again), want, rtol=1e-4, atol=1e-4)


def _dequantize(model: nn.Module, name: str) -> None:
    """Swap the Linear4bit `name` for a plain nn.Linear holding its dequantized weight (as a merge does)."""
    layer = model.get_submodule(name)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight.data = layer.dequantize()
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, plain)


def test_tied_embeddings_bias_and_shards(tmp_path: Path) -> None:
    path = _save_tiny(tmp_path / "tied", tie=True, bias=True, shard="40KB")
    assert (path / "model.safetensors.index.json").exists()
    ours = load_model(path, compute_dtype=torch.float32, device="cpu")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    q = ours.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit) and q.bias is not None and q.bias.abs().sum() > 0
    torch.testing.assert_close(_logits(ours), _bnb_logits(_bnb_model(path)), rtol=0, atol=0)
    save_quantized(ours, tmp_path / "tied4")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "tied4", device_map="cpu")
    torch.testing.assert_close(_bnb_logits(theirs), _logits(ours), rtol=0, atol=0)


def test_tutorial_call_style_and_bitsandbytes_config(tiny: Path) -> None:
    qc = {
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float16",
    }
    model = load_model(tiny, load_in_4bit=True, quantization_config=qc, device="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quant_state.quant_type == "fp4" and not layer.quant_state.nested
    assert layer.compute_dtype == torch.float16 and model.model.embed_tokens.weight.dtype == torch.float16

    bnb_cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["o_proj"],
    )  # fmt: skip
    model = load_model(tiny, quantization_config=bnb_cfg, device="cpu")
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, Linear4bit) and attn.q_proj.compute_dtype == torch.bfloat16
    assert type(attn.o_proj) is nn.Linear and attn.o_proj.weight.dtype == torch.bfloat16
    assert model(input_ids=IDS).logits.dtype == torch.bfloat16

    plain = load_model(tiny, load_in_4bit=False, compute_dtype="float32", device="cpu")
    assert not any(isinstance(m, Linear4bit) for m in plain.modules())


def test_skip_modules_survive_a_save_for_transformers(tiny: Path, tmp_path: Path) -> None:
    ours = load_model(tiny, compute_dtype=torch.float32, device="cpu", skip_modules=["down_proj"])
    assert type(ours.model.layers[0].mlp.down_proj) is nn.Linear
    save_quantized(ours, tmp_path / "skip4")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "skip4", device_map="cpu")
    assert type(theirs.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(_bnb_logits(theirs), _logits(ours), rtol=0, atol=0)


def test_checkpoint_missing_quant_state_names_the_tensor(tiny: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    ours = load_model(tiny, compute_dtype=torch.float32, device="cpu")
    save_quantized(ours, tmp_path / "broken")
    file = tmp_path / "broken" / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight.absmax"]
    save_file(tensors, file, {"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*absmax"):
        load_model(tmp_path / "broken", device="cpu")

    del tensors["model.layers.0.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4"]
    tensors["model.layers.1.mlp.up_proj.weight.absmax"] = torch.zeros(1)
    save_file(tensors, file, {"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*quant_state"):
        load_model(tmp_path / "broken", device="cpu")


def test_bad_options_are_clear_errors(tiny: Path) -> None:
    with pytest.raises(ValueError, match=r"quantization 'int4' .*'nf4'"):
        load_model(tiny, quantization="int4", device="cpu")
    with pytest.raises(ValueError, match=r"blocksize 48 .*allowed"):
        load_model(tiny, blocksize=48, device="cpu")
    with pytest.raises(ValueError, match="load_in_8bit"):
        load_model(tiny, quantization_config={"load_in_8bit": True}, device="cpu")
    with pytest.raises(ValueError, match=r"compute_dtype='int8'"):
        load_model(tiny, compute_dtype="int8", device="cpu")
    with pytest.raises(ValueError, match="no model.safetensors"):
        _load_without_weights(tiny)


def _load_without_weights(tiny: Path) -> None:
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(tiny / "config.json", d)
        load_model(d, device="cpu")


def test_device_map_naming_one_device_is_honoured(tiny):
    model = load_model(tiny, compute_dtype=torch.float32, device_map={"": "cpu"})
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(device_map="auto"), "device_map='auto' is refused"),
    (dict(device_map={"a": "cpu", "b": "cuda:0"}), "one device"),
    (dict(device="cpu", device_map="cuda:0"), "disagree"),
    (dict(low_cpu_mem_usage=True), r"unknown keyword\(s\) \['low_cpu_mem_usage'\]"),
])
def test_unknown_keywords_and_spreading_device_maps_are_refused(tiny, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        load_model(tiny, compute_dtype=torch.float32, **kwargs)
