"""PromptEncoderConfig: PEFT's P-tuning fields and meaning, checked up front."""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

from slimtune.config import PeftType, coerce_enum
from slimtune.methods.prompt_learning.config import PromptLearningConfig, check_positive


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network that turns the virtual token embeddings into the prompt."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclasses.dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al. 2021): virtual token embeddings passed through an MLP or a bidirectional LSTM + MLP."""

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    """MLP: three Linear layers with ReLU; LSTM: a bidirectional LSTM followed by a two-layer MLP."""
    encoder_hidden_size: int | None = None
    """Hidden size of the encoder network. None: token_dim."""
    encoder_num_layers: int = 2
    """LSTM layers (the MLP always has 3 Linear layers; another value only warns there, as in peft)."""
    encoder_dropout: float = 0.0
    """Dropout between LSTM layers, in [0, 1)."""

    peft_type: ClassVar[PeftType] = PeftType.P_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = coerce_enum(
            PromptEncoderReparameterizationType, self.encoder_reparameterization_type, "encoder_reparameterization_type")
        check_positive("encoder_hidden_size", self.encoder_hidden_size)
        check_positive("encoder_num_layers", self.encoder_num_layers)
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout={self.encoder_dropout!r} must be in [0, 1)")
