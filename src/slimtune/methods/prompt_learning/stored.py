"""StoredPrompt: a prompt adapter loaded for inference is the saved prompt itself, not its encoder.

peft saves one tensor per prompt adapter, `prompt_embeddings`: the encoder's *output* (the virtual token
embeddings, or the flattened prefix keys/values). The encoder's own weights (P-tuning's MLP/LSTM, prefix
tuning's projection) are not in the file, so a loaded adapter is a frozen table of that output; like peft,
slimtune refuses to load a prompt adapter as trainable.
"""

from __future__ import annotations

import torch
from torch import nn


class StoredPrompt(nn.Module):
    """The frozen prompt, (rows, dim); `embedding` is peft's module name for it."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, dim, _weight=torch.zeros(rows, dim))

    def forward(self) -> torch.Tensor:
        return self.embedding.weight
