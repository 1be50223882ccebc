"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors rescale attention keys/values and feedforward inputs. On Linear, Conv1D, Linear4bit."""

from __future__ import annotations

from torch import nn

from slimtune.architectures import column, for_model_type
from slimtune.methods.ia3.config import IA3Config
from slimtune.methods.ia3.layer import IA3Layer, IA3Vector
from slimtune.methods.spec import MethodSpec
from slimtune.targeting import default_targets, find_targets, pattern_fullmatch

__all__ = ["IA3Config", "IA3Layer", "METHOD"]


def is_feedforward(config: IA3Config, module_name: str) -> bool:
    """peft's rule: a regex must match the full name; a list entry matches when the name ends with it."""
    ff = config.feedforward_modules or []
    if isinstance(ff, str):
        return pattern_fullmatch(ff, module_name, "feedforward_modules")
    return any(module_name.endswith(key) for key in ff)


def _fill_defaults(model: nn.Module, config: IA3Config) -> None:
    """Write the per-architecture targets into the config (as peft does), so the saved file is explicit."""
    if config.target_modules is None:
        config.target_modules = default_targets(model, column("ia3_targets"), "IA3")
    if config.feedforward_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        feedforward = for_model_type(model_type).ia3_feedforward
        if feedforward is None:
            raise ValueError(
                f"IA3: feedforward_modules is not set and there is no default for model_type={model_type!r}; "
                "set feedforward_modules (a list, possibly empty, of target names whose input is scaled)"
            )
        config.feedforward_modules = list(feedforward)


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


METHOD = MethodSpec(config_cls=IA3Config, inject=inject)
