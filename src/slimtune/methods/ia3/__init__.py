"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors rescale attention keys/values and feedforward inputs. On Linear, Conv1D, Linear4bit."""

from __future__ import annotations

from torch import nn

from slimtune.methods.ia3.config import IA3Config
from slimtune.methods.ia3.layer import IA3Layer, IA3Vector
from slimtune.methods.spec import MethodSpec
from slimtune.targeting import default_targets, find_targets, pattern_fullmatch

__all__ = ["IA3Config", "IA3Layer", "METHOD"]

# peft's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING (peft 0.21).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"], "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"], "deberta": ["in_proj", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "bart": ["q_proj", "v_proj", "fc2"], "phi": ["q_proj", "v_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    **{t: ["query_key_value", "dense_4h_to_h"] for t in ("gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel")},
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"], "llama4": ["q_proj", "v_proj", "down_proj"],
    **{t: ["q_proj", "v_proj", "down_proj"] for t in ("gemma", "gemma2", "gemma3_text", "qwen2", "qwen3")},
}
DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"], "bert": ["output.dense"], "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"], "opt": ["fc2"], "bart": ["fc2"], "phi": ["fc2"], "gptj": ["fc_out"],
    "gpt_neo": ["c_proj"],
    **{t: ["dense_4h_to_h"] for t in ("gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel")},
    **{t: ["down_proj"] for t in ("llama", "llama4", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3")},
    "mixtral": ["w2"],
}


def is_feedforward(config: IA3Config, module_name: str) -> bool:
    """peft's rule: a regex must match the full name; a list entry matches when the name ends with it."""
    ff = config.feedforward_modules or []
    if isinstance(ff, str):
        return pattern_fullmatch(ff, module_name, "feedforward_modules")
    return any(module_name.endswith(key) for key in ff)


def _fill_defaults(model: nn.Module, config: IA3Config) -> None:
    """Write the per-architecture targets into the config (as peft does), so the saved file is explicit."""
    if config.target_modules is None:
        config.target_modules = default_targets(model, DEFAULT_TARGETS, "IA3")
    if config.feedforward_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_FEEDFORWARD:
            raise ValueError(
                f"IA3: feedforward_modules is not set and there is no default for model_type={model_type!r}; "
                "set feedforward_modules (a list, possibly empty, of target names whose input is scaled)"
            )
        config.feedforward_modules = list(DEFAULT_FEEDFORWARD[model_type])


def inject(model: nn.Module, config: IA3Config, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Wrap every target module of `model` in an IA3Layer and add vector `adapter_name` to it."""
    _fill_defaults(model, config)
    names = find_targets(model, config.target_modules, exclude_modules=config.exclude_modules,
                         skip=config.modules_to_save or ())
    for name in names:
        layer = IA3Layer.wrap(model, name, config)
        in_features, out_features = layer.features()
        vector = IA3Vector(in_features, out_features, is_feedforward(config, name), config.init_ia3_weights)
        device, dtype = layer.placement(autocast_adapter_dtype)
        layer.add(adapter_name, vector.to(device=device, dtype=dtype))


METHOD = MethodSpec(config_cls=IA3Config, inject=inject, default_targets=DEFAULT_TARGETS)
