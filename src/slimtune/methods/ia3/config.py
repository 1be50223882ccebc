"""IA3Config: PEFT's (IA)^3 fields and meaning, checked up front."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from slimtune.config import PeftConfig, PeftType


@dataclasses.dataclass
class IA3Config(PeftConfig):
    """(IA)^3: a learned vector rescales each adapted layer's output, or its input for feedforward layers.

    y = l * (W x + b) for attention-like layers (l: (out, 1)); y = W (l * x) + b for feedforward layers
    (l: (1, in)). The vectors start at 1, so the adapted model starts equal to the base model.
    """

    target_modules: list[str] | str | None = None
    """Module names or suffixes, a regex matched against full names, or 'all-linear'. None: per-architecture default."""
    exclude_modules: list[str] | str | None = None
    """Names or a regex of modules never adapted."""
    feedforward_modules: list[str] | str | None = None
    """Targets whose input (not output) is scaled: a list (a module matches when its full name ends with an
    entry, as in peft) or a regex matched against full names. None: per-architecture default."""
    fan_in_fan_out: bool = False
    """True when the layer stores its weight as (in, out), like GPT-2's Conv1D (detected automatically)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classifier head)."""
    init_ia3_weights: bool = True
    """True: the vectors start at 1 (adapter is a no-op). False: random normal values (tests only)."""

    peft_type: ClassVar[PeftType] = PeftType.IA3

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, field)
            if isinstance(value, (set, tuple, list)):
                setattr(self, field, sorted(value))
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"{field}={value!r} must be a list of module names, a regex string, or None")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights={self.init_ia3_weights!r} must be True or False")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ValueError(
                f"feedforward_modules={ff!r} must be a subset of target_modules={targets!r}; "
                f"not targeted: {sorted(set(ff) - set(targets))}"
            )
