"""LoraConfig: PEFT's LoRA fields and meaning, checked up front."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Protocol

from slimtune.config import PeftConfig, PeftType
from slimtune.targeting import check_pattern, pattern_fullmatch

INIT_CHOICES = "True, False, 'gaussian', 'pissa' or 'pissa_niter_<k>'"
BIAS_CHOICES = ("none", "all", "lora_only")


class LoraFields(Protocol):
    """The LoRA fields that AdaLoraConfig keeps and checks the same way."""

    lora_alpha: float
    lora_dropout: float
    bias: str


@dataclasses.dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation: W x + (alpha / r) * B A x, with A (r, in) and B (out, r)."""

    r: int = 8
    """Rank of the update."""
    target_modules: list[str] | str | None = None
    """Module names or suffixes, a regex matched against full names, or 'all-linear'. None: per-architecture default."""
    exclude_modules: list[str] | str | None = None
    """Names or a regex of modules never adapted."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1)."""
    fan_in_fan_out: bool = False
    """True when the layer stores its weight as (in, out), like GPT-2's Conv1D."""
    bias: str = "none"
    """Which biases train: 'none', 'all' (every bias of the model) or 'lora_only' (biases of adapted layers)."""
    use_rslora: bool = False
    """Rank-stabilized scaling lora_alpha / sqrt(r)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classifier head)."""
    init_lora_weights: bool | str = True
    """True: A Kaiming-uniform, B zero; 'gaussian': A ~ N(0, 1/r); False: random B (tests only); 'pissa': SVD init."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt these block indices."""
    layers_pattern: list[str] | str | None = None
    """Name of the block list used with layers_to_transform (default: layers, h, block, blocks, layer)."""
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per-module rank overrides: {name or regex: r}."""
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per-module alpha overrides: {name or regex: alpha}."""
    use_dora: bool = False
    """Weight-decomposed LoRA: a trained magnitude per output row times the normalized direction W + BA."""

    peft_type: ClassVar[PeftType] = PeftType.LORA

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank("r", self.r)
        check_alpha_dropout_bias(self)
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init == "gaussian" or pissa_iters(init) is not None):
            raise ValueError(f"init_lora_weights={init!r} is not valid; allowed: {INIT_CHOICES}")
        for field in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, field)
            if value is None:
                setattr(self, field, {})
            elif not isinstance(value, dict):
                raise TypeError(f"{field}={value!r} must be a mapping of module name (or regex) -> value")
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            if not value > 0:
                raise ValueError(f"alpha_pattern[{key!r}]={value!r} must be > 0")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.layers_to_transform is not None and isinstance(self.target_modules, str) and \
                self.target_modules != "all-linear":
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """(r, alpha) for one module, after rank_pattern / alpha_pattern."""
        r = self.rank_pattern[key] if (key := _pattern_key(self.rank_pattern, module_name, "rank_pattern")) else self.r
        alpha = (self.alpha_pattern[key] if (key := _pattern_key(self.alpha_pattern, module_name, "alpha_pattern"))
                 else self.lora_alpha)
        return r, alpha


def check_alpha_dropout_bias(config: LoraFields) -> None:
    """lora_alpha > 0, lora_dropout in [0, 1), bias one of BIAS_CHOICES (LoRA's fields, which AdaLoRA keeps)."""
    if not config.lora_alpha > 0:
        raise ValueError(f"lora_alpha={config.lora_alpha!r} must be > 0")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={config.lora_dropout!r} must be in [0, 1)")
    if config.bias not in BIAS_CHOICES:
        raise ValueError(f"bias={config.bias!r} is not valid; allowed: {', '.join(BIAS_CHOICES)}")


def _check_rank(field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field}={value!r} must be a positive integer")


def pissa_iters(init: object) -> int | None:
    """0 for exact-SVD 'pissa', k for 'pissa_niter_k' (randomized SVD), None if not a PiSSA init."""
    if init == "pissa":
        return 0
    if isinstance(init, str) and (found := re.fullmatch(r"pissa_niter_(\d+)", init)):
        return int(found.group(1))
    return None


def _pattern_key(patterns: dict, name: str, field: str) -> str | None:
    """PEFT's rule: a pattern key applies when it matches the end of the module name (Note: bounded patterns,
    targeting.py)."""
    for key in patterns:
        check_pattern(key, f"{field} key")
        if pattern_fullmatch(rf"(.*\.)?({key})", name, f"{field} key {key!r}"):
            return key
    return None
