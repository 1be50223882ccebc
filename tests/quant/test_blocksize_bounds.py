"""Block sizes are checked at every door: load_model's keyword, a quantization_config and a checkpoint's quant state.

The quantizer, the Triton kernels and bitsandbytes take powers of two from 32 to 4096; anything else is
refused with the key that carried it, never quantized or decoded with a block size no kernel was built for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtune.quant import load_model, save_quantized
from slimtune.quant_format.state import VALID_BLOCKSIZES

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 77, 3, 120, 42, 8]])
STATE_KEY = "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("blocksize", [48, 16, 8192, 0, -64, 64.0, True, "64", None])
def test_keyword_blocksize_outside_the_table_is_refused(tiny: Path, blocksize: object) -> None:
    with pytest.raises(ValueError, match=rf"blocksize {blocksize!r} is not supported; allowed: \(32, 64"):
        load_model(tiny, blocksize=blocksize, device="cpu")


@pytest.mark.parametrize("blocksize", [48, 64.5, "128", False])
def test_quantization_config_blocksize_outside_the_table_is_refused(tiny: Path, blocksize: object) -> None:
    config = {"load_in_4bit": True, "bnb_4bit_blocksize": blocksize}
    with pytest.raises(ValueError, match=rf"bnb_4bit_blocksize {blocksize!r} is not supported"):
        load_model(tiny, quantization_config=config, device="cpu")


def test_double_quant_must_be_a_bool(tiny: Path) -> None:
    config = {"load_in_4bit": True, "bnb_4bit_use_double_quant": "false"}  # a string is truthy: refuse it
    with pytest.raises(TypeError, match="double_quant must be true or false, got 'false'"):
        load_model(tiny, quantization_config=config, device="cpu")


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_every_allowed_blocksize_round_trips(tiny: Path, tmp_path: Path, blocksize: int) -> None:
    assert blocksize in VALID_BLOCKSIZES
    ours = load_model(tiny, quantization_config={"load_in_4bit": True, "bnb_4bit_blocksize": blocksize},
                      compute_dtype=torch.float32, device="cpu")
    layer = ours.model.layers[1].mlp.up_proj
    assert layer.quant_state.blocksize == blocksize
    assert layer.quant_state.absmax.numel() == -(-layer.weight.numel() * 2 // blocksize)
    save_quantized(ours, tmp_path / "q")
    again = load_model(tmp_path / "q", compute_dtype=torch.float32, device="cpu")
    assert again.model.layers[1].mlp.up_proj.quant_state.blocksize == blocksize
    torch.testing.assert_close(_logits(again), _logits(ours), rtol=0, atol=0)


def _rewrite_state(folder: Path, **changes: object) -> None:
    """Change fields of one tensor's JSON quant state; absmax is resized so that only the changed field is off."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    fields = json.loads(bytes(tensors[STATE_KEY].tolist()).decode())
    fields.update(changes)
    tensors[STATE_KEY] = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)
    prefix = STATE_KEY.split("quant_state.")[0]
    numel = torch.Size(fields["shape"]).numel()
    if isinstance(fields["blocksize"], int) and fields["blocksize"] > 0:
        n_blocks = -(-numel // fields["blocksize"])
        tensors[f"{prefix}absmax"] = torch.zeros(n_blocks, dtype=tensors[f"{prefix}absmax"].dtype)
        nested = fields.get("nested_blocksize")
        if isinstance(nested, int) and nested > 0:
            tensors[f"{prefix}nested_absmax"] = torch.ones(-(-n_blocks // nested))
    save_file(tensors, file, {"format": "pt"})


@pytest.mark.parametrize(("field", "value"), [("blocksize", 48), ("blocksize", 2), ("blocksize", 8192),
                                              ("blocksize", 64.0), ("nested_blocksize", 100),
                                              ("nested_blocksize", 1), ("nested_blocksize", "256")])
def test_checkpoint_quant_state_blocksize_outside_the_table_is_refused(
    tiny: Path, tmp_path: Path, field: str, value: object
) -> None:
    save_quantized(load_model(tiny, compute_dtype=torch.float32, device="cpu"), tmp_path / "q")
    _rewrite_state(tmp_path / "q", **{field: value})
    with pytest.raises(ValueError, match=rf"{STATE_KEY}: {field} {value!r} is not supported; allowed: \(32"):
        load_model(tmp_path / "q", device="cpu")


def test_a_rewritten_but_valid_state_still_loads(tiny: Path, tmp_path: Path) -> None:
    """The rewrite itself leaves a loadable checkpoint: the refusals above come from the block size alone."""
    save_quantized(load_model(tiny, compute_dtype=torch.float32, device="cpu"), tmp_path / "q")
    _rewrite_state(tmp_path / "q", blocksize=128, nested_blocksize=128)
    state = load_model(tmp_path / "q", device="cpu").model.layers[1].mlp.up_proj.quant_state
    assert (state.blocksize, state.state2.blocksize) == (128, 128)
