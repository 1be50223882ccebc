"""Which modules an adapter method adapts: names or suffixes, a regex, "all-linear", layer filters.

The rules are PEFT's, so a config means the same thing here and in peft:
- a list of names matches a module whose full name equals a name or ends with "." + name;
- a string is a regular expression that must match the full module name;
- "all-linear" takes every linear layer except the model's output head;
- layers_to_transform keeps modules whose name holds "<layers_pattern>.<index>." with a listed index.

# Note: bounded patterns
Patterns come from adapter_config.json files of any origin, and Python's `re` backtracks without limit:
`([a-z_.0-9]+)+!` against one module name runs for hours. A pattern must compile with `re` (the engine
peft uses, so a file means the same in both) and is matched with the `regex` module, which has the same
syntax for these patterns, avoids most catastrophic backtracking on its own, and stops any match after
PATTERN_TIMEOUT_S. A pattern that times out is refused with a ValueError naming its field; so is one
`re` cannot compile, or one longer than MAX_PATTERN_CHARS (module names are short; a pattern peft needs is too).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import regex
from torch import nn

LINEAR_TYPE_NAMES = ("Linear", "Conv1D", "Linear4bit")
# Children of adapter wrappers: never targets themselves (a second adapter must not wrap the first's A/B).
WRAPPER_PARTS = frozenset({"base_layer", "adapters", "original_module", "modules_to_save"})
LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D, or a 4-bit linear: a 2-D weight applied to the last dimension."""
    return isinstance(module, nn.Linear) or type(module).__name__ in LINEAR_TYPE_NAMES


PATTERN_TIMEOUT_S = 0.5
"""Longest time one pattern may take to match one module name (Note: bounded patterns)."""
MAX_PATTERN_CHARS = 2000


def check_pattern(pattern: object, field: str) -> None:
    """Raise ValueError unless `pattern` is a regex `re` compiles, of at most MAX_PATTERN_CHARS characters."""
    if not isinstance(pattern, str):
        raise TypeError(f"{field}={pattern!r} must be a string (a regular expression)")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{field}: a pattern of {len(pattern)} characters is too long; at most {MAX_PATTERN_CHARS}")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ValueError(f"{field}={pattern!r} is not a valid regular expression ({err})") from None


def pattern_fullmatch(pattern: str, name: str, field: str) -> bool:
    """Whether `pattern` matches all of `name`, within PATTERN_TIMEOUT_S (Note: bounded patterns)."""
    check_pattern(pattern, field)
    try:
        return regex.fullmatch(pattern, name, timeout=PATTERN_TIMEOUT_S) is not None
    except TimeoutError:
        raise ValueError(f"{field}={pattern!r} takes over {PATTERN_TIMEOUT_S} s to match the module name {name!r} "
                         "(nested repetition or backreferences); use a list of module names or a simpler "
                         "pattern") from None
    except regex.error as err:
        raise ValueError(f"{field}={pattern!r} is not a valid regular expression ({err})") from None


def _matches(name: str, targets: str | Sequence[str], field: str) -> bool:
    if isinstance(targets, str):
        return pattern_fullmatch(targets, name, field)
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
        elif not _matches(name, target_modules, "target_modules"):
            continue
        if exclude_modules and _matches(name, exclude_modules, "exclude_modules"):
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


def default_targets(model: nn.Module, table: dict[str, Sequence[str]], method: str) -> list[str]:
    """The per-architecture default target modules for `method`, from the model's config.model_type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in table:
        raise ValueError(
            f"{method}: target_modules is not set and there is no default for model_type={model_type!r}; "
            f"set target_modules (e.g. 'all-linear' or a list of names). Defaults exist for: {', '.join(sorted(table))}"
        )
    return list(table[model_type])
