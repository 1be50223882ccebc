"""Which modules an adapter method adapts: names or suffixes, a regex, "all-linear", layer filters.

The rules are PEFT's, so a config means the same thing here and in peft:
- a list of names matches a module whose full name equals a name or ends with "." + name;
- a string is a regular expression that must match the full module name;
- "all-linear" takes every linear layer except the model's output head;
- layers_to_transform keeps modules whose name holds "<layers_pattern>.<index>." with a listed index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

LINEAR_TYPE_NAMES = ("Linear", "Conv1D", "Linear4bit")
# Children of adapter wrappers: never targets themselves (a second adapter must not wrap the first's A/B).
WRAPPER_PARTS = frozenset({"base_layer", "adapters", "original_module", "modules_to_save"})
LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D, or a 4-bit linear: a 2-D weight applied to the last dimension."""
    return isinstance(module, nn.Linear) or type(module).__name__ in LINEAR_TYPE_NAMES


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The transformer block index in a module name such as 'model.layers.3.mlp.up_proj', if any."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or LAYER_PATTERNS)
    for pattern in patterns:
        found = re.match(rf".*\.{re.escape(pattern)}\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the module(s) holding the output head (lm_head), never taken by "all-linear"."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names or {n for n, _ in model.named_modules() if n.split(".")[-1] in ("lm_head", "embed_out")}


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Full names of the modules to adapt, in model order. Raises ValueError if nothing matches."""
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    heads = output_head_names(model) if all_linear else set()
    layers = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    skip = tuple(skip)
    found = []
    for name, module in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if not WRAPPER_PARTS.isdisjoint(name.split(".")):
            continue
        if all_linear:
            layer = module._modules.get("base_layer", module)  # an adapter wrapper counts as its base layer
            if not is_linear_like(layer) or name in heads:
                continue
        elif not _matches(name, target_modules):
            continue
        if exclude_modules and _matches(name, exclude_modules):
            continue
        if layers is not None and layer_index(name, layers_pattern) not in layers:
            continue
        found.append(name)
    if not found:
        raise ValueError(_no_match_message(model, target_modules, layers))
    return found


def _no_match_message(model: nn.Module, targets: object, layers: object) -> str:
    suffixes = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and len(list(m.children())) == 0})
    where = f" within layers {layers}" if layers is not None else ""
    return (
        f"target_modules={targets!r} matched no module of {type(model).__name__}{where}. "
        f"Module names that exist: {', '.join(suffixes)}"
    )


def default_targets(model: nn.Module, table: dict[str, list[str]], method: str) -> list[str]:
    """The per-architecture default target modules for `method`, from the model's config.model_type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in table:
        raise ValueError(
            f"{method}: target_modules is not set and there is no default for model_type={model_type!r}; "
            f"set target_modules (e.g. 'all-linear' or a list of names). Defaults exist for: {', '.join(sorted(table))}"
        )
    return list(table[model_type])
