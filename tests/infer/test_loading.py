"""`load_for_inference` (behind chat, serve, eval and merge) takes the shipped model's `slimtune:` name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimtune.infer.loading import load_for_inference


def test_the_shipped_name_loads_the_cached_folder(shipped_model_cache: Path) -> None:
    by_name = load_for_inference("slimtune:smollm2-135m-instruct", dtype="fp32", device="cpu")
    by_folder = load_for_inference(shipped_model_cache, dtype="fp32", device="cpu")
    assert by_name.base_name == "smollm2-135m-instruct"  # what serve's requests call the base model
    assert by_name.tokenizer_source == str(shipped_model_cache)
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        assert torch.equal(by_name.model(ids).logits, by_folder.model(ids).logits)


def test_an_unknown_name_is_refused_before_loading() -> None:
    with pytest.raises(ValueError, match=r"model='slimtune:smol': no shipped model 'smol'; known names: "
                                         r"slimtune:smollm2-135m-instruct"):
        load_for_inference("slimtune:smol", device="cpu")
