"""Export a merged Llama-architecture model to GGUF (f16, q8_0 or f32) with the `gguf` package.

What llama.cpp's convert_hf_to_gguf.py writes for a Llama model, and nothing else:
  metadata   general.architecture=llama, general.name, general.file_type, general.quantization_version,
             llama.{context_length, embedding_length, block_count, feed_forward_length,
             rope.dimension_count, rope.freq_base, attention.head_count, attention.head_count_kv,
             attention.layer_norm_rms_epsilon, attention.key_length/value_length, vocab_size}
  tokenizer  tokenizer.ggml.model=gpt2 (byte-level BPE), .pre (pre-tokenizer, identified like
             convert_hf_to_gguf by hashing the token ids of a fixed text), .tokens, .token_type, and
             through gguf.SpecialVocab: .merges, bos/eos/unk/pad ids, add_bos/add_eos, chat_template
  tensors    names from gguf's Llama tensor map (token_embd, blk.N.attn_q, ..., output_norm, output);
             1-D tensors (norms) in f32; 2-D in the chosen type; a q8_0 tensor whose rows are not
             a multiple of 32 falls back to f16, as convert_hf_to_gguf does.

# Note: q/k permutation
HF Llama checkpoints order each attention head's rotary dimensions as two halves (rotate_half);
llama.cpp's RoPE works on interleaved pairs. convert_hf_to_gguf therefore permutes the rows of
q_proj (per query head) and k_proj (per key/value head): (n_head, 2, d/2, in) -> (n_head, d/2, 2, in).
transformers' GGUF loader applies the inverse when it reads a llama GGUF.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtune.architectures import column, for_model_type
from slimtune.errors import MissingDependency
from slimtune.models import refuse_remote_tokenizer

OUTTYPES = ("f16", "q8_0", "f32")
"""GGUF tensor types we write for 2-D weights."""

# From llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre): the text whose token ids identify a
# BPE pre-tokenizer, and the hashes of known ones.
CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 '
    '333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
    '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
    '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
}


def export_gguf(model_dir: str | os.PathLike, output: str | os.PathLike, outtype: str = "f16",
                pre_tokenizer: str | None = None, name: str | None = None) -> Path:
    """Write the model in `model_dir` (merged, HF format) to the GGUF file `output`; returns its path."""
    gguf = _import_gguf()
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r} is not allowed; use one of {', '.join(OUTTYPES)}")
    folder = Path(model_dir)
    config = _read_config(folder)
    from transformers import AutoTokenizer

    refuse_remote_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _write_hparams(writer, gguf, config, name or folder.name, outtype)
        _write_tokenizer(writer, gguf, tokenizer, folder, config["vocab_size"], pre_tokenizer)
        for tensor_name, data, qtype in _tensors(gguf, folder, config, outtype):
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, out)
    return out


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingDependency("GGUF export needs the 'gguf' package: pip install gguf (or slimtune[gguf])") from None
    return gguf


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} holds no config.json; export a merged model folder (slimtune merge --output)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if not for_model_type(config.get("model_type")).gguf_export:
        raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not supported by the GGUF export; "
                         f"supported: {', '.join(column('gguf_export'))}")
    if "quantization_config" in config:
        raise ValueError(f"{path} describes a quantized checkpoint; merge it first (slimtune merge dequantizes)")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise ValueError(f"{path}: rope_type {rope.get('rope_type')!r} is not supported by the GGUF export yet "
                         "(supported: default, linear)")
    return config


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """Rotary settings: transformers 5 `rope_parameters`, or the older rope_theta + rope_scaling."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _write_hparams(writer: Any, gguf: Any, config: dict[str, Any], name: str, outtype: str) -> None:
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "f32": gguf.LlamaFileType.ALL_F32}[outtype]
    rope = _rope(config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if config.get("head_dim") is not None:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    writer.add_file_type(file_type)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def pre_tokenizer_name(tokenizer: Any) -> str | None:
    """llama.cpp's name for this tokenizer's BPE pre-tokenizer, or None when the hash is unknown."""
    ids = tokenizer.encode(CHECK_TEXT)
    return KNOWN_PRE.get(hashlib.sha256(str(ids).encode()).hexdigest())


def _write_tokenizer(writer: Any, gguf: Any, tokenizer: Any, folder: Path, vocab_size: int,
                     pre_tokenizer: str | None) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model_type = json.loads(backend.to_str())["model"]["type"] if backend is not None else None
    if model_type != "BPE":
        raise ValueError(f"{folder}: the GGUF export writes byte-level BPE (gpt2-style) tokenizers; this one is "
                         f"{model_type or type(tokenizer).__name__}")
    pre = pre_tokenizer or pre_tokenizer_name(tokenizer)
    if pre is None:
        raise ValueError(f"{folder}: unknown BPE pre-tokenizer (its check hash is not in slimtune's table); "
                         "pass --pre-tokenizer NAME with llama.cpp's name for it (e.g. smollm, llama-bpe, qwen2, "
                         "gpt-2; 'default' works for simple whitespace-split tokenizers)")
    tokens, types = vocab_tokens(gguf, tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def vocab_tokens(gguf: Any, tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..vocab_size-1, as convert_hf_to_gguf's get_vocab_base."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _tensors(gguf: Any, folder: Path, config: dict[str, Any], outtype: str) -> Iterator[tuple[str, np.ndarray, Any]]:
    """(gguf name, data, GGML type) per tensor, in checkpoint order."""
    n_layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    tied = bool(config.get("tie_word_embeddings", False))
    for key, tensor in _checkpoint(folder):
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"{folder}: tensor {key!r} has no GGUF Llama name; is this a plain Llama checkpoint?")
        data = tensor.float()
        if key.endswith("q_proj.weight"):
            data = permute_qk(data, n_head)
        elif key.endswith("k_proj.weight"):
            data = permute_qk(data, n_kv)
        yield (new, *_encode(gguf, data.numpy(), outtype))


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotary halves -> interleaved pairs, per head; see Note: q/k permutation. (out, in) -> (out, in)."""
    out = weight.shape[0]
    return weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(gguf: Any, data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    types = gguf.GGMLQuantizationType
    if data.ndim <= 1 or outtype == "f32":
        return data.astype(np.float32), types.F32
    if outtype == "q8_0":
        try:
            return gguf.quants.quantize(data, types.Q8_0), types.Q8_0
        except gguf.quants.QuantError:
            pass  # rows not a multiple of the block size: f16, as convert_hf_to_gguf does
    return data.astype(np.float16), types.F16


def _checkpoint(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                yield key, handle.get_tensor(key)
