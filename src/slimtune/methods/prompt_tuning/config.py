"""PromptTuningConfig: PEFT's prompt tuning fields and meaning, checked up front."""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

from slimtune.config import PeftType, coerce_enum
from slimtune.methods.prompt_learning.config import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    """How the virtual token embeddings start."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021): n learned embeddings prepended to the input embeddings."""

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    """RANDOM: N(0, 1) rows; SAMPLE_VOCAB: embeddings of random vocabulary tokens; TEXT: embeddings of
    prompt_tuning_init_text's tokens, repeated or cut to the number of virtual tokens."""
    prompt_tuning_init_text: str | None = None
    """The text whose token embeddings start the prompt (prompt_tuning_init=TEXT only)."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer (hub name or local folder) that splits prompt_tuning_init_text (TEXT only)."""
    tokenizer_kwargs: dict | None = None
    """Extra AutoTokenizer.from_pretrained arguments (TEXT only; trust_remote_code is never passed on)."""

    peft_type: ClassVar[PeftType] = PeftType.PROMPT_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = coerce_enum(PromptTuningInit, self.prompt_tuning_init, "prompt_tuning_init")
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text and not self.tokenizer_name_or_path:
            raise ValueError(f"prompt_tuning_init='TEXT' needs tokenizer_name_or_path; got {self.tokenizer_name_or_path!r}")
        if text and not self.prompt_tuning_init_text:
            raise ValueError(f"prompt_tuning_init='TEXT' needs prompt_tuning_init_text; got {self.prompt_tuning_init_text!r}")
        if self.tokenizer_kwargs and not text:
            raise ValueError(f"tokenizer_kwargs={self.tokenizer_kwargs!r} is only used with prompt_tuning_init='TEXT', "
                             f"not {self.prompt_tuning_init.value!r}")
