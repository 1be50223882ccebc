"""GGUF export: tensors read back with GGUFReader (f16 exact, q8_0 within quantization error), Llama
metadata and tokenizer as convert_hf_to_gguf writes them, transformers loads the file back."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from safetensors.torch import load_file
from tiny_chat import cli_app
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from slimtune.infer.gguf_export import export_gguf, permute_qk, pre_tokenizer_name
from slimtune.infer.merge import merge_to_dir


@pytest.fixture(scope="module")
def merged(tiny_chat, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "merged"
    merge_to_dir(str(tiny_chat.base), tiny_chat.adapters["alpha"], out, dtype="fp32", device="cpu")
    return out


def _expected_tensors(merged):
    """HF tensors under their GGUF names, q/k permuted (what the file must hold)."""
    config = json.loads((merged / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    out = {}
    for key, tensor in load_file(merged / "model.safetensors").items():
        if key.endswith("q_proj.weight"):
            tensor = permute_qk(tensor, config["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            tensor = permute_qk(tensor, config["num_key_value_heads"])
        out[names.get_name(key, try_suffixes=(".weight", ".bias"))] = tensor.float().numpy()
    return out


def _read(path):
    reader = gguf.GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        tensors[t.name] = (t.tensor_type, dequantize(t.data, t.tensor_type).reshape(shape))
    return reader, tensors


def test_f16_tensors_exact_and_metadata(merged, tmp_path):
    path = export_gguf(merged, tmp_path / "m-f16.gguf", "f16", pre_tokenizer="default")
    reader, tensors = _read(path)
    expected = _expected_tensors(merged)
    assert set(tensors) == set(expected) and "output.weight" in tensors  # untied head is written
    for name, (kind, data) in tensors.items():
        want = expected[name]
        if want.ndim == 1:
            assert kind == gguf.GGMLQuantizationType.F32 and np.array_equal(data, want), name
        else:
            assert kind == gguf.GGMLQuantizationType.F16
            assert np.array_equal(data, want.astype(np.float16).astype(np.float32)), name
    fields = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    config = json.loads((merged / "config.json").read_text())
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 1
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 8
    assert fields["llama.context_length"] == config["max_position_embeddings"]
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    tokenizer = AutoTokenizer.from_pretrained(merged)
    vocab = {t: i for i, t in enumerate(fields["tokenizer.ggml.tokens"])}
    assert vocab == tokenizer.get_vocab()
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert fields["tokenizer.ggml.token_type"][im_start] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.token_type"][100] == gguf.TokenType.NORMAL
    assert len(fields["tokenizer.ggml.merges"]) > 0


def test_q8_0_within_quantization_error(merged, tmp_path):
    path = export_gguf(merged, tmp_path / "m-q8.gguf", "q8_0", pre_tokenizer="default")
    reader, tensors = _read(path)
    assert {v.contents() for k, v in reader.fields.items() if k == "general.file_type"} == {7}
    expected = _expected_tensors(merged)
    for name, (kind, data) in tensors.items():
        want = expected[name]
        if want.ndim == 1:
            assert kind == gguf.GGMLQuantizationType.F32
            continue
        assert kind == gguf.GGMLQuantizationType.Q8_0, name
        blocks = want.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # one int8 step per 32-value block
        err = np.abs(data.reshape(-1, 32) - blocks)
        # half a step from rounding, plus the f16 scale's relative error (2^-11) times |q| <= 127
        assert (err <= (0.5 + 127 * 2.0**-11) * step + 1e-12).all(), name
        assert err.max() > 0  # it really is quantized


@pytest.mark.parametrize("outtype, atol", [("f16", 5e-3), ("q8_0", 0.1)])
def test_transformers_loads_export_back(merged, tmp_path, outtype, atol):
    path = export_gguf(merged, tmp_path / f"m-{outtype}.gguf", outtype, pre_tokenizer="default")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 30, 44, 100, 200, 300, 12]])
    with torch.no_grad():
        diff = (loaded(ids).logits - reference(ids).logits).abs().max().item()
    scale = reference(ids).logits.abs().max().item()
    assert diff < atol * max(1.0, scale), (diff, scale)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ref_tok = AutoTokenizer.from_pretrained(merged)
    text = "Hello there! 床前明月光 <|im_start|>user"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]


def test_permute_qk_is_per_head_interleave():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of dim 4
    p = permute_qk(w, 2)
    # head 0 rows [0, 1, 2, 3] (halves [0, 1] and [2, 3]) become [0, 2, 1, 3]
    assert torch.equal(p[:4], w[[0, 2, 1, 3]]) and torch.equal(p[4:], w[[4, 6, 5, 7]])


def test_errors_unknown_pre_tokenizer_and_architecture(merged, tmp_path):
    assert pre_tokenizer_name(AutoTokenizer.from_pretrained(merged)) is None
    with pytest.raises(ValueError, match="unknown BPE pre-tokenizer .* --pre-tokenizer"):
        export_gguf(merged, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="--outtype 'q4' is not allowed"):
        export_gguf(merged, tmp_path / "x.gguf", "q4")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        export_gguf(other, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_two_types(merged, tmp_path):
    result = CliRunner().invoke(cli_app(), ["export", "--gguf", "--model", str(merged), "--output", str(tmp_path),
                                            "--outtype", "f16", "--outtype", "q8_0", "--pre-tokenizer", "default"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged-f16.gguf").is_file() and (tmp_path / "merged-q8_0.gguf").is_file()
    assert (tmp_path / "merged-q8_0.gguf").stat().st_size < (tmp_path / "merged-f16.gguf").stat().st_size
    no_format = CliRunner().invoke(cli_app(), ["export", "--model", str(merged), "--output", str(tmp_path)])
    assert no_format.exit_code == 2 and "--gguf" in no_format.output


@pytest.mark.slow
def test_smollm2_exports_and_reloads(tmp_path):
    """The real default model: pre-tokenizer identified as smollm, tied head, transformers reload."""
    from slimtune.models import default_model_path

    folder = default_model_path()
    path = export_gguf(folder, tmp_path / "smollm2-f16.gguf", "f16")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = back(ids).logits, ref(ids).logits
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()
    assert torch.equal(a[0, -1].argmax(), b[0, -1].argmax())


def test_cli_export_by_shipped_name(shipped_model_cache, tmp_path):
    """`--model slimtune:smollm2-135m-instruct` exports the cached folder (here a tiny stand-in) under its name."""
    result = CliRunner().invoke(cli_app(), ["export", "--gguf", "--model", "slimtune:smollm2-135m-instruct",
                                            "--output", str(tmp_path / "out"), "--pre-tokenizer", "default"])
    assert result.exit_code == 0, result.output
    reader, tensors = _read(tmp_path / "out" / "smollm2-135m-instruct-f16.gguf")
    embed = load_file(shipped_model_cache / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(tensors["token_embd.weight"][1], embed.half().float().numpy())
    unknown = CliRunner().invoke(cli_app(), ["export", "--gguf", "--model", "slimtune:nope", "--output", str(tmp_path)])
    assert unknown.exit_code == 2 and "--model='slimtune:nope': no shipped model 'nope'" in unknown.output
