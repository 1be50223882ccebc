"""AdapterLayerBase: the one wrapping rule and the bookkeeping LoRA, IA3 and AdaLoRA layers share."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import slimtune
from slimtune.adapter_layer import AdapterLayerBase
from slimtune.methods.adalora import AdaLoraLayer
from slimtune.methods.ia3 import IA3Layer
from slimtune.methods.lora import LoraLayer
from tiny_models import TINY_MODELS

CASES = {
    "lora": (LoraLayer, lambda **kw: slimtune.LoraConfig(r=2, **kw)),
    "ia3": (IA3Layer, lambda **kw: slimtune.IA3Config(feedforward_modules=[], **kw)),
    "adalora": (AdaLoraLayer, lambda **kw: slimtune.AdaLoraConfig(init_r=2, target_r=1, total_step=10, **kw)),
}


@pytest.mark.parametrize("method", list(CASES))
def test_conv1d_fan_in_fan_out_is_detected_warned_and_saved(method: str) -> None:
    layer_cls, make = CASES[method]
    config = make(target_modules=["c_attn"])  # fan_in_fan_out=False, but GPT-2's Conv1D stores (in, out)
    with pytest.warns(UserWarning, match="c_attn: Conv1D uses fan_in_fan_out=True; using that"):
        model = slimtune.get_peft_model(TINY_MODELS["gpt2"].model(), config)
    layers = [m for m in model.modules() if isinstance(m, layer_cls)]
    assert len(layers) == 2 and all(layer.fan_in_fan_out for layer in layers)
    assert model.peft_config["default"].fan_in_fan_out is True
    assert layers[0].features() == (32, 96)  # (in, out) of c_attn, read through the (in, out) storage


def test_embeddings_have_no_layout_to_correct() -> None:
    config = slimtune.LoraConfig(r=2, target_modules=["embed_tokens"], fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = slimtune.get_peft_model(TINY_MODELS["llama"].model(), config)
    layer = model.base_model.model.model.embed_tokens
    assert isinstance(layer, LoraLayer) and not layer.fan_in_fan_out and config.fan_in_fan_out is True


@pytest.mark.parametrize("method", ["ia3", "adalora"])
def test_only_lora_adapts_embeddings(method: str) -> None:
    layer_cls, make = CASES[method]
    with pytest.raises(ValueError, match=f"{layer_cls.method} cannot adapt module 'model.embed_tokens' of type "
                                         r"Embedding; supported layer types: nn.Linear, Conv1D \(GPT-2\), Linear4bit$"):
        slimtune.get_peft_model(TINY_MODELS["llama"].model(), make(target_modules=["embed_tokens"]))


class _Scale(AdapterLayerBase):
    """The smallest layer method: y = base(x) * s per adapter; merging scales the weight (no bias)."""

    method = "Scale"

    def merge_one(self, name: str) -> None:
        self.base_layer.weight.data *= self.adapters[name].s

    def unmerge_one(self, name: str) -> None:
        self.base_layer.weight.data /= self.adapters[name].s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name in [] if self.disabled else self.pending():
            out = out * self.adapters[name].s
        return out


def _adapter(s: float) -> nn.Module:
    adapter = nn.Module()
    adapter.s = nn.Parameter(torch.tensor(s))
    return adapter


def test_bookkeeping_active_merged_and_deleted() -> None:
    torch.manual_seed(0)
    layer = _Scale(nn.Linear(4, 3, bias=False))
    layer.add("a", _adapter(2.0))
    layer.add("b", _adapter(3.0))
    layer.set_active(["b", "missing", "a"], trainable=True)
    assert layer.active == ["b", "a"] and layer.adapters["a"].s.requires_grad
    x = torch.randn(2, 4)
    expected = layer(x)
    layer.merge(["a", "a", "missing"])
    assert layer.merged == ["a"] and layer.pending() == ["b"]
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="adapter 'a' is merged; unmerge it before deleting"):
        layer.delete("a")
    layer.unmerge()
    layer.delete("a")
    assert layer.active == ["b"] and list(layer.adapters) == ["b"]
    assert layer.in_features == 4 and layer.weight is layer.base_layer.weight  # the base layer's attributes
    assert layer.unloaded(merge=False) is layer.base_layer
