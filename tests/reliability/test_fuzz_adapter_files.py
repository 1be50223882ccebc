"""Fuzzing what slimtune reads from an adapter folder and from a bnb-4bit checkpoint.

- adapter_config.json: random JSON and mutations of a real config -> a PeftConfig or a ValueError/TypeError
  naming the file or the field;
- adapter_model.safetensors: truncated, bit-flipped and header-forged files -> the exact tensors, or a
  ValueError naming the file (read_weights), and PeftModel.from_pretrained never loads a broken adapter;
- 4-bit quant state (QuantState.from_dict and load_model on a saved bnb-4bit checkpoint): missing or corrupt
  quant-state keys, forged JSON blobs and wrong shapes -> a ValueError, never a model whose shapes are wrong.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reliability_tools import count, fuzz_settings, time_limit
from safetensors.torch import save_file

from slimtune.adapter_io import read_weights
from slimtune.config import CONFIG_NAME, WEIGHTS_NAME, PeftConfig

SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=10))
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=10)
LORA = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "base_model_name_or_path": "m",
        "inference_mode": True, "fan_in_fan_out": False, "modules_to_save": None}
FIELDS = [*LORA, "peft_type", "use_dora", "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern",
          "layers_to_transform", "megatron_config", "loftq_config", "num_virtual_tokens", "auto_mapping"]


# ---- adapter_config.json ------------------------------------------------------------------------------------------
@given(data=st.one_of(
    JSON,
    st.tuples(st.dictionaries(st.sampled_from(FIELDS), st.one_of(JSON, st.sampled_from(
        ["LORA", "IA3", "ADALORA", "PREFIX_TUNING", "lora", "CAUSAL_LM", "all-linear", -1, 0, 10**30, [], {}]))),
        st.sets(st.sampled_from(list(LORA)))).map(lambda t: {**{k: v for k, v in LORA.items() if k not in t[1]},
                                                          **t[0]})),
    raw=st.one_of(st.none(), st.sampled_from(["", "{", "[" * 50_000, '{"peft_type": "LORA"', "\xff", "null",
                                              '{"r": 1e999}', '{"r": ' + "9" * 5000 + "}"])))
@fuzz_settings(300)
def test_fuzz_adapter_config(tmp_path_factory: pytest.TempPathFactory, data: object, raw: str | None) -> None:
    count("adapter_config")
    folder = tmp_path_factory.mktemp("acfg")
    text = json.dumps(data) if raw is None else raw
    (folder / CONFIG_NAME).write_bytes(text.encode("utf-8", errors="surrogateescape"))
    try:
        with time_limit(10):
            config = PeftConfig.from_pretrained(folder)
    except (ValueError, TypeError) as err:
        message = str(err)
        assert message and "\n" not in message.strip(), message
        return
    # accepted: it must write back and read again to an equal config
    config.save_pretrained(folder / "again")
    assert PeftConfig.from_pretrained(folder / "again").to_dict() == config.to_dict()


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("value", [None, [1, 2]])
def test_lora_config_with_null_patterns(tmp_path: Path, field: str, value: object) -> None:
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**LORA, field: value}))
    with contextlib.suppress(ValueError, TypeError):  # a clear error, or a config with the default patterns
        PeftConfig.from_pretrained(tmp_path)


# ---- adapter_model.safetensors -------------------------------------------------------------------------------------
def _good_weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 32),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(32, 4)}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return tensors


@given(cut=st.one_of(st.none(), st.integers(0, 2000)), flips=st.lists(st.tuples(st.integers(0, 2000),
                                                                                st.integers(0, 255)), max_size=4),
       header=st.one_of(st.none(), JSON, st.sampled_from([
           {"x": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}},
           {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
           {"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}},
           {"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}])),
       length=st.sampled_from([None, 0, 2**63, 10**9]))
@fuzz_settings(300)
def test_fuzz_safetensors_adapter(tmp_path_factory: pytest.TempPathFactory, cut: int | None, flips: list,
                                  header: object, length: int | None) -> None:
    count("adapter_safetensors")
    folder = tmp_path_factory.mktemp("aw")
    good = _good_weights(folder)
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    if header is not None:  # a forged JSON header over the real data
        head = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(head)) + head + data[8 + struct.unpack("<Q", data[:8])[0]:])
    if length is not None:
        data[:8] = struct.pack("<Q", length % 2**64)
    for at, byte in flips:
        data[at % len(data)] = byte
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    try:
        with time_limit(10):
            got = read_weights(folder)
    except ValueError as err:
        assert WEIGHTS_NAME in str(err)
        return
    assert isinstance(got, dict) and all(isinstance(v, torch.Tensor) for v in got.values())
    if set(got) == set(good) and not flips and header is None and length is None:
        assert all(torch.equal(got[k], good[k]) for k in good)


# ---- bnb-4bit quant state ------------------------------------------------------------------------------------------
def _state_dict() -> dict[str, torch.Tensor]:
    from slimtune.quant_format.nf4 import quantize_4bit

    torch.manual_seed(0)
    packed, state = quantize_4bit(torch.randn(64, 32), "nf4", 64, True)
    return {"w.weight": packed, **state.as_dict("w.weight.")}


QKEYS = ["absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"]
BLOB_FIELDS = st.dictionaries(st.sampled_from(["quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                                               "nested_dtype", "nested_offset"]),
                              st.one_of(JSON, st.sampled_from(["nf4", "fp4", "float32", "bfloat16", "int8", 64, 0,
                                                               -64, 256, [64, 32], [32, 64], [2048], [64, 32, 1],
                                                               [-64, -32], [0, 32], 0.5])))


def _mutate(tensors: dict[str, torch.Tensor], drop: set[str], shape_edits: list[tuple[str, int]],
            blob: dict | None, raw_blob: bytes | None) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in tensors.items() if k.removeprefix("w.weight.") not in drop}
    for key, n in shape_edits:
        full = "w.weight" if key == "weight" else f"w.weight.{key}"
        if full in out:
            t = out[full].reshape(-1)
            out[full] = t[: n] if n < t.numel() else torch.cat([t, t[: n - t.numel()]]) if t.numel() else t
    blob_key = "w.weight.quant_state.bitsandbytes__nf4"
    if blob_key in out and (blob is not None or raw_blob is not None):
        fields = json.loads(bytes(out[blob_key].tolist()))
        payload = raw_blob if raw_blob is not None else json.dumps({**fields, **blob}).encode()
        out[blob_key] = torch.tensor(list(payload), dtype=torch.uint8)
    return out


MUTATION = dict(
    drop=st.sets(st.sampled_from(["weight", *QKEYS])),
    shape_edits=st.lists(st.tuples(st.sampled_from(["weight", "absmax", "quant_map", "nested_absmax",
                                                    "nested_quant_map"]), st.integers(0, 1500)), max_size=2),
    blob=st.one_of(st.none(), BLOB_FIELDS),
    raw_blob=st.one_of(st.none(), st.sampled_from([b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"shape": [64, 32]}',
                                                   b"1" * 5000])))


@given(**MUTATION)
@fuzz_settings(400)
def test_fuzz_quant_state_from_dict(drop: set[str], shape_edits: list, blob: dict | None,
                                    raw_blob: bytes | None) -> None:
    from slimtune.quant_format.nf4 import dequantize_4bit
    from slimtune.quant_format.state import QuantState

    count("quant_state")
    tensors = _mutate(_state_dict(), drop, shape_edits, blob, raw_blob)
    try:
        with time_limit(10):
            state = QuantState.from_dict(tensors, prefix="w.weight.", packed=tensors.get("w.weight"))
    except ValueError as err:
        assert "w.weight" in str(err), str(err)
        return
    weight = dequantize_4bit(tensors["w.weight"], state)  # an accepted state must dequantize to its shape
    assert tuple(weight.shape) == tuple(state.shape) and torch.isfinite(weight).all()


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_run import build_llama

    from slimtune.quant import load_model, save_quantized

    plain = tmp_path_factory.mktemp("plain")
    build_llama(plain)
    folder = tmp_path_factory.mktemp("bnb4") / "ckpt"
    save_quantized(load_model(plain, compute_dtype=torch.float32, device="cpu"), folder)
    return folder


@given(layer=st.sampled_from(["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]), **MUTATION)
@fuzz_settings(60)
def test_fuzz_bnb_4bit_checkpoint(tmp_path_factory: pytest.TempPathFactory, bnb_checkpoint: Path, layer: str,
                                  drop: set[str], shape_edits: list, blob: dict | None, raw_blob: bytes | None) -> None:
    import shutil

    from safetensors.torch import load_file

    from slimtune.quant import Linear4bit, load_model

    count("bnb_4bit_checkpoint")
    folder = tmp_path_factory.mktemp("bnbfuzz") / "ckpt"
    shutil.copytree(bnb_checkpoint, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    prefix = f"{layer}.weight"
    mine = {("w.weight" + k[len(prefix):]): v for k, v in tensors.items() if k.startswith(prefix)}
    mutated = _mutate(mine, drop, shape_edits, blob, raw_blob)
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    rest.update({prefix + k[len("w.weight"):]: v.contiguous() for k, v in mutated.items()})
    save_file(rest, str(folder / "model.safetensors"), metadata={"format": "pt"})
    try:
        with time_limit(30):
            model = load_model(folder, compute_dtype=torch.float32, device="cpu")
    except ValueError:
        return
    module = model.get_submodule(layer)
    assert isinstance(module, Linear4bit)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 9, 7]])).logits
    assert out.shape == (1, 4, 320) and torch.isfinite(out).all()


# ---- hostile adapter folders: patterns that would hang, values that poison (Note: bounded patterns) ----------------
CATASTROPHIC = "([a-z_.0-9]+)+!"
BACKREF = r"(.*)(.*)(.*)(.*)(.*)(.*)(.*)\7\6q"  # slow even for `regex`: its time limit answers
ADAPTER_ATTACKS = {
    "target_modules catastrophic": ({"target_modules": CATASTROPHIC}, "matched no module"),
    "target_modules backreferences": ({"target_modules": BACKREF}, "takes over"),
    "exclude_modules catastrophic": ({"exclude_modules": CATASTROPHIC}, None),
    "rank_pattern catastrophic": ({"rank_pattern": {CATASTROPHIC: 2}}, None),
    "alpha_pattern backreferences": ({"alpha_pattern": {BACKREF: 2.0}}, "takes over"),
    "layers_pattern catastrophic": ({"layers_to_transform": [0], "layers_pattern": CATASTROPHIC}, "matched no"),
    "target_modules invalid": ({"target_modules": "(q_proj"}, "target_modules='(q_proj' is not a valid regular"),
    "rank_pattern invalid": ({"rank_pattern": {"q_proj[": 2}}, "rank_pattern key='q_proj[' is not a valid"),
    "alpha_pattern invalid": ({"alpha_pattern": {"*": 2.0}}, "alpha_pattern key='*' is not a valid"),
    "string boolean": ({"use_rslora": "false"}, "use_rslora='false' must be true or false; got a string"),
    "string integer": ({"r": "4"}, "r='4' must be an integer; got a string"),
    "alpha Infinity": ({"lora_alpha": float("inf")}, "lora_alpha=inf must be a finite number"),
    "dropout NaN": ({"lora_dropout": float("nan")}, "lora_dropout=nan must be a finite number"),
    "alpha_pattern NaN": ({"alpha_pattern": {"q_proj": float("nan")}}, "must be a finite number"),
    "target_modules empty": ({"target_modules": []}, "target_modules is empty"),
    "modules_to_save mistyped": ({"modules_to_save": "lm_head"}, "modules_to_save='lm_head' must be"),
    "layers_to_transform mistyped": ({"layers_to_transform": ["0"]}, "layers_to_transform=['0'] must be"),
    "r too large to allocate": ({"r": 10**13}, "the adapter does not fit in memory"),
}


@pytest.mark.parametrize("attack", sorted(ADAPTER_ATTACKS))
def test_hostile_adapter_config_is_bounded_and_named(tmp_path: Path, attack: str) -> None:
    """Loading onto a tiny Llama ends within seconds, in an adapter or one line naming the file and field."""
    from slimtune import PeftModel, get_peft_model
    from tiny_models import TINY_MODELS

    fields, message = ADAPTER_ATTACKS[attack]
    good = get_peft_model(TINY_MODELS["llama"].model(), PeftConfig.from_dict({**LORA, "inference_mode": False}))
    good.save_pretrained(str(tmp_path / "adapter"))
    file = tmp_path / "adapter" / CONFIG_NAME
    file.write_text(json.dumps({**json.loads(file.read_text()), **fields}))
    count("hostile_adapter_configs")
    try:
        with time_limit(20):
            model = PeftModel.from_pretrained(TINY_MODELS["llama"].model(), tmp_path / "adapter")
    except (ValueError, TypeError) as err:
        text = str(err)
        assert message is not None and message in text, text
        assert "\n" not in text and str(file) in text, text
        return
    assert message is None, f"accepted: {attack}"
    assert model.peft_config["default"].to_dict()["rank_pattern"] == fields.get("rank_pattern", {})


@pytest.mark.parametrize("bad", ["nan", "inf", "int64", "int8", "bool"])
def test_adapter_tensors_that_are_not_finite_floats_are_refused(tmp_path: Path, bad: str) -> None:
    from safetensors.torch import load_file

    from slimtune import PeftModel, get_peft_model
    from tiny_models import TINY_MODELS

    good = get_peft_model(TINY_MODELS["llama"].model(), PeftConfig.from_dict({**LORA, "inference_mode": False}))
    good.save_pretrained(str(tmp_path / "adapter"))
    weights = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))
    key = sorted(weights)[0]
    if bad in ("nan", "inf"):
        weights[key][0, 0] = float(bad)
    else:
        weights[key] = weights[key].to(getattr(torch, bad))
    save_file(weights, str(tmp_path / "adapter" / WEIGHTS_NAME))
    count("hostile_adapter_tensors")
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*tensor {key} (holds NaN or inf|has dtype)"):
        PeftModel.from_pretrained(TINY_MODELS["llama"].model(), tmp_path / "adapter")
