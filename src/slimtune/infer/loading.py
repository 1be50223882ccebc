"""Loading for inference: one base model, zero or more named adapters, and the tokenizer to talk to it.

The tokenizer comes from the first adapter folder that holds one (a `slimtune train` run saves the
tokenizer with its chat template and a generation_config.json stopping at the end-of-turn token next
to the adapter), else from the base model. Stop token ids are the union of the generation config's
`eos_token_id` and the tokenizer's eos.

A QLoRA adapter was trained against the 4-bit base, so by default (`quantization="auto"`) the base is
loaded as the adapter folder's base_quantization.json records (slimtune.adapter_base), or, for a folder
without one, 4-bit when the run folder above it (`<run>/config.yaml`) says `method: qlora`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from slimtune.adapter_base import BaseQuantization, read_base_quantization
from slimtune.dtypes import parse_dtype
from slimtune.models import refuse_remote_tokenizer, resolve_model

QUANTIZATIONS = ("auto", "none", "nf4", "fp4")
"""`--quantization` values: auto (4-bit only for a QLoRA run's adapter), none, nf4, fp4."""

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Allowed adapter names: they are looked up in a dict, never used as paths."""

DTYPE_CHOICES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
"""`--dtype` values: auto (bf16 on a GPU that supports it, else fp32) or a name in slimtune.dtypes."""


@dataclass
class LoadedModel:
    """A model ready to generate: adapters loaded (all inactive but `active`), tokenizer left-padding."""

    model: nn.Module
    """The transformers model, wrapped in a slimtune PeftModel when adapters were given."""
    tokenizer: Any
    """Tokenizer with a pad token and `padding_side="left"` (batched generation)."""
    base_name: str
    """Name of the base model (the folder's name); a request for it runs with adapters disabled."""
    adapters: dict[str, Path] = field(default_factory=dict)
    """Adapter name -> the folder it was loaded from, in load order."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Generation stops at any of these (eos, end-of-turn)."""
    tokenizer_source: str = ""
    """Where the tokenizer (and generation_config.json, if any) came from: an adapter folder or the model."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def parse_adapter_args(values: list[str] | None) -> dict[str, Path]:
    """`--adapter` values (`NAME=DIR` or `DIR`, whose name is then its folder name) -> {name: folder}."""
    out: dict[str, Path] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep:
            path = value
            folder = Path(value).resolve()
            # a run's adapter lives in <run>/adapter: name it after the run
            name = folder.parent.name if folder.name == "adapter" else folder.name
        if not ADAPTER_NAME.match(name):
            raise ValueError(f"--adapter {value!r}: adapter name {name!r} is not allowed; use letters, digits, "
                             "'.', '_' or '-' (at most 64 characters), e.g. --adapter support=runs/a/adapter")
        if name in out:
            raise ValueError(f"--adapter {value!r}: the name {name!r} is given twice; name them NAME=DIR")
        out[name] = Path(path).expanduser()
    return out


def load_for_inference(model: str | os.PathLike, adapters: dict[str, str | os.PathLike] | None = None,
                       quantization: str = "auto", dtype: str = "auto", device: str | None = None,
                       base_name: str | None = None) -> LoadedModel:
    """Load `model` (folder, hub name or slimtune: name) and each adapter folder; the first adapter is active."""
    adapter_dirs = {name: _check_adapter_dir(Path(path), name) for name, path in (adapters or {}).items()}
    target = _device(device)
    torch_dtype = _resolve_dtype(dtype, target)
    model = resolve_model(model)  # after the cheap checks: a slimtune: name may convert first
    tokenizer, tok_source = _load_tokenizer(str(model), list(adapter_dirs.values()))
    quant = _resolve_quantization(quantization, list(adapter_dirs.values()))
    base = _load_base(str(model), quant, torch_dtype, target)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))  # tokens the training template added
    wrapped: nn.Module = base
    if adapter_dirs:
        from slimtune.peft_model import PeftModel

        names = list(adapter_dirs)
        wrapped = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            wrapped.load_adapter(adapter_dirs[name], adapter_name=name)
        wrapped.set_adapter(names[0])
    wrapped.eval()
    _load_generation_config(base, tok_source)
    stop = _stop_ids(base, tokenizer)
    name = base_name or Path(str(model)).name or str(model)
    if name in adapter_dirs:
        raise ValueError(f"adapter name {name!r} equals the base model's name; rename the adapter (NAME=DIR)")
    return LoadedModel(wrapped, tokenizer, name, adapter_dirs, stop, tok_source)


def _check_adapter_dir(path: Path, name: str) -> Path:
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"adapter {name!r}: {path} holds no adapter_config.json; pass the folder a training "
                         "run saved (e.g. runs/my-run/adapter)")
    return path


def _device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return parse_dtype(dtype, "--dtype", DTYPE_CHOICES)
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda_bf16 else torch.float32


def _load_tokenizer(model: str, adapter_dirs: list[Path]) -> tuple[Any, str]:
    from transformers import AutoTokenizer

    source = next((str(d) for d in adapter_dirs if (d / "tokenizer_config.json").is_file()), model)
    refuse_remote_tokenizer(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a tokenizer from {source!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {source!r} has neither a pad nor an eos token; batched generation "
                             "needs one to pad with")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out
    tokenizer.padding_side = "left"
    return tokenizer, source


def _resolve_quantization(quantization: str, adapter_dirs: list[Path]) -> BaseQuantization:
    """How to load the base: `quantization` itself unless "auto", else as the first adapter that says."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization {quantization!r} is not allowed; use one of {', '.join(QUANTIZATIONS)}")
    if quantization != "auto":
        return BaseQuantization(quantization, quantization != "none")
    for folder in adapter_dirs:
        record = read_base_quantization(folder)
        if record is not None:
            return record
        run_config = folder.parent / "config.yaml"
        if run_config.is_file():
            from slimtune.strict_yaml import load_yaml

            raw = load_yaml(run_config) or {}  # beside an adapter from anywhere (Note: strict YAML)
            if not isinstance(raw, dict):
                raise ValueError(f"{run_config}: expected the run config of the adapter's run (a mapping); "
                                 f"got a {type(raw).__name__}; pass --quantization to skip reading it")
            if raw.get("method") == "qlora":
                quant = raw.get("quant") or {}
                return BaseQuantization(str(quant.get("type", "nf4")), quant.get("double_quant", True) is not False)
    return BaseQuantization("none", False)


def _load_base(model: str, quant: BaseQuantization, dtype: torch.dtype, device: torch.device) -> nn.Module:
    try:
        if quant.quantization in ("nf4", "fp4"):
            from slimtune.quant import load_model  # lazy: only 4-bit bases need the quant code

            return load_model(model, quantization=quant.quantization, double_quant=quant.double_quant,
                              compute_dtype=dtype, device=device)
        from transformers import AutoModelForCausalLM

        # use_safetensors: a folder holding only pytorch_model.bin is refused, never unpickled
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=False).to(device)
    except (OSError, SafetensorError) as err:  # SafetensorError: a truncated download, for one
        raise ValueError(f"--model {model!r}: cannot load it ({str(err).splitlines()[0]})") from None


def _load_generation_config(model: nn.Module, source: str) -> None:
    """Use the generation config saved next to the tokenizer (it knows the end-of-turn token)."""
    if not (Path(source) / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(source, trust_remote_code=False)


def _stop_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
