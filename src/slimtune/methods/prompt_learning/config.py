"""PromptLearningConfig: the fields prompt tuning, prefix tuning and P-tuning share (PEFT's names and meaning),
and how the model-shape fields are filled from a transformers config when left unset."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from slimtune.config import PeftConfig, TaskType


@dataclasses.dataclass
class PromptLearningConfig(PeftConfig):
    """Virtual tokens learned in front of the input (or of every layer's keys/values, for prefix tuning)."""

    num_virtual_tokens: int | None = None
    """How many virtual tokens to learn (required, > 0)."""
    token_dim: int | None = None
    """Hidden size of the base model's embeddings. None: read from the model config."""
    num_transformer_submodules: int | None = None
    """1 (decoder-only or encoder-only) or 2 (encoder-decoder). None: 2 for SEQ_2_SEQ_LM, else 1."""
    num_attention_heads: int | None = None
    """Attention heads of the base model (key/value heads for prefix tuning). None: read from the model config."""
    num_layers: int | None = None
    """Transformer layers of the base model. None: read from the model config."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (a SEQ_CLS head is added automatically)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None:
            raise ValueError(f"{type(self).__name__}: num_virtual_tokens is required (a positive integer)")
        for name in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers"):
            check_positive(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(f"num_transformer_submodules={self.num_transformer_submodules!r} is not valid; "
                             "allowed: 1, 2 or None")

    @property
    def is_prompt_learning(self) -> bool:
        """peft's spelling, read by code written against peft."""
        return True

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the learned prompt: one set of virtual tokens per transformer submodule."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


def check_positive(name: str, value: Any) -> None:
    """ValueError naming `name` unless `value` is None or a positive integer."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{name}={value!r} must be a positive integer (or None to read it from the model)")


def _first(config: Any, names: tuple[str, ...], field: str) -> int:
    """The first of `names` the model config has, in peft's order of preference."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    as_dict = as_dict.get("text_config") or as_dict
    for name in names:
        if name in as_dict and as_dict[name] is not None:
            return as_dict[name]
    raise ValueError(f"cannot read {field} from the model config ({type(config).__name__}); set {field} in the "
                     f"adapter config (looked for: {', '.join(names)})")


def fill_from_model(config: PromptLearningConfig, model: nn.Module) -> None:
    """Fill unset shape fields from the model config, as peft's _prepare_prompt_learning_config does."""
    model_config = getattr(model, "config", None)
    if model_config is None and None in (config.num_layers, config.token_dim, config.num_attention_heads):
        raise ValueError(f"{type(model).__name__} has no .config; set num_layers, token_dim and "
                         "num_attention_heads in the adapter config")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    if config.num_layers is None:
        layers = getattr(model_config, "num_hidden_layers", None)
        config.num_layers = layers or _first(model_config, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers")
    if config.token_dim is None:
        config.token_dim = _first(model_config, ("hidden_size", "n_embd", "d_model"), "token_dim")
    if config.num_attention_heads is None:
        config.num_attention_heads = _first(
            model_config, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
            "num_attention_heads")


def input_embeddings(model: nn.Module) -> nn.Module:
    """The base model's token embedding (what the virtual tokens live next to)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise ValueError(f"{type(model).__name__} exposes no input embeddings (get_input_embeddings()); "
                         "prompt learning needs them")
    return embeddings
