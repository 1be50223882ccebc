"""AdaLoraConfig: PEFT's AdaLoRA fields and meaning (its own plus the LoRA fields it inherits), checked up front.

# Note: AdaLoRA's three phases
Steps are counted from 0 (the first optimizer step calls update_and_allocate(0), as in peft's examples).
1. warmup, step <= tinit: every adapter keeps init_r triplets; sensitivities accumulate.
2. budgeting, tinit < step < total_step - tfinal: the total rank budget falls on a cubic curve from
   init_r * n to target_r * n (n adapted matrices); every deltaT steps the least important triplets
   (singular values lora_E) are masked to zero until the budget holds.
3. final, step >= total_step - tfinal: at step total_step - tfinal the budget is target_r * n and the
   mask is frozen into rank_pattern; later steps re-apply it. Saving writes only the kept triplets, and
   rank_pattern in adapter_config.json lets a loader rebuild the pruned shapes.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

from slimtune.config import PeftConfig, PeftType
from slimtune.methods.lora.config import check_alpha_dropout_bias


@dataclasses.dataclass
class AdaLoraConfig(PeftConfig):
    """Adaptive LoRA: W x + P diag(E) Q x * lora_alpha / ranknum with a rank budget shared across layers."""

    init_r: int = 12
    """Initial rank of every adapted matrix (number of singular triplets)."""
    target_r: int = 8
    """Average rank per matrix left after budgeting (total budget target_r * number of matrices)."""
    tinit: int = 0
    """Warmup steps before any rank is pruned."""
    tfinal: int = 0
    """Final steps that train with the frozen rank mask."""
    deltaT: int = 1
    """Re-allocate the budget every deltaT steps during budgeting."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity |w * grad|, in (0, 1)."""
    beta2: float = 0.85
    """EMA coefficient of the sensitivity's uncertainty, in (0, 1)."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty mean(||A A^T - I||_F, ||B^T B - I||_F) added to the training loss."""
    total_step: int | None = None
    """Total number of optimizer steps of the run; required (> 0), it places the budget schedule."""
    rank_pattern: dict[str, list[bool]] | None = None
    """Kept triplets per matrix, {'<module>.lora_E': [bool] * init_r}; written by the allocator, read on load."""
    r: int = 8
    """Unused by AdaLoRA (peft keeps it from LoRA); set init_r instead."""
    target_modules: list[str] | str | None = None
    """Module names or suffixes, a regex matched against full names, or 'all-linear'. None: per-architecture default."""
    exclude_modules: list[str] | str | None = None
    """Names or a regex of modules never adapted."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / ranknum (ranknum = init_r)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1)."""
    fan_in_fan_out: bool = False
    """True when the layer stores its weight as (in, out), like GPT-2's Conv1D (detected automatically)."""
    bias: str = "none"
    """Which biases train: 'none', 'all' (every bias of the model) or 'lora_only' (biases of adapted layers)."""
    use_rslora: bool = False
    """Unsupported by AdaLoRA (peft ignores it); only False is accepted."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classifier head)."""
    init_lora_weights: bool = True
    """True: E zero, A and B ~ N(0, 0.02) (the adapter starts as a no-op); False: random normal (tests only)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt these block indices."""
    layers_pattern: list[str] | str | None = None
    """Name of the block list used with layers_to_transform (default: layers, h, block, blocks, layer)."""
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    """Unsupported by AdaLoRA (peft ignores it); only {} is accepted."""
    use_dora: bool = False
    """Unsupported by AdaLoRA; only False is accepted."""

    peft_type: ClassVar[PeftType] = PeftType.ADALORA

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, field), (set, tuple, list)):
                setattr(self, field, sorted(getattr(self, field)))
        self._check_ranks_and_schedule()
        self._check_lora_fields()

    def _check_ranks_and_schedule(self) -> None:
        for field in ("init_r", "target_r", "total_step", "deltaT"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                hint = " (the number of optimizer steps of the run)" if field == "total_step" else ""
                raise ValueError(f"AdaLoRA needs {field} to be a positive integer{hint}; got {field}={value!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} must be <= init_r={self.init_r}: AdaLoRA only prunes ranks")
        for field in ("tinit", "tfinal"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{field}={value!r} must be an integer >= 0")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no budgeting phase: "
                "need tinit < total_step - tfinal (decrease tinit/tfinal or increase total_step)"
            )
        for field in ("beta1", "beta2"):
            if not 0.0 < getattr(self, field) < 1.0:
                raise ValueError(f"{field}={getattr(self, field)!r} must be in (0, 1)")
        if not self.orth_reg_weight >= 0:
            raise ValueError(f"orth_reg_weight={self.orth_reg_weight!r} must be >= 0")
        for key, kept in (self.rank_pattern or {}).items():
            if not isinstance(kept, list) or not all(isinstance(k, bool) for k in kept):
                raise ValueError(f"rank_pattern[{key!r}] must be a list of booleans (kept triplets), got {kept!r}")

    def _check_lora_fields(self) -> None:
        if self.use_dora:
            raise ValueError("use_dora=True is not supported by AdaLoRA; use LoraConfig(use_dora=True)")
        if self.use_rslora:
            raise ValueError("use_rslora=True has no effect in AdaLoRA (its scale is lora_alpha / ranknum); remove it")
        if self.alpha_pattern:
            raise ValueError(f"alpha_pattern={self.alpha_pattern!r} is not used by AdaLoRA; only {{}} is accepted")
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} must be True or False for AdaLoRA")
        check_alpha_dropout_bias(self)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform to be set too")
        if self.r != 8:
            warnings.warn(f"r={self.r} is not used by AdaLoRA and is ignored; set init_r for the initial rank",
                          stacklevel=3)
