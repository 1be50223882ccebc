"""PrefixTuningConfig: PEFT's prefix tuning fields and meaning, checked up front."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from slimtune.config import PeftType
from slimtune.methods.prompt_learning.config import PromptLearningConfig, check_positive


@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang 2021): learned keys and values for n virtual positions in every layer."""

    encoder_hidden_size: int | None = None
    """Hidden size of the projection MLP (prefix_projection=True). None: token_dim."""
    prefix_projection: bool = False
    """Reparameterize the prefix as MLP(embedding) while training (only the MLP's output is saved)."""
    init_weights: str | None = None
    """None: random start; 'zero': a zero prefix (keys and values 0: the model's output barely moves)."""

    peft_type: ClassVar[PeftType] = PeftType.PREFIX_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("encoder_hidden_size", self.encoder_hidden_size)
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights={self.init_weights!r} is not valid; allowed: None, 'zero'")
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection={self.prefix_projection!r} must be True or False")
