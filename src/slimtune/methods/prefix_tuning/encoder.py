"""PrefixEncoder: the learned prefix, (num_virtual_tokens, num_layers * 2 * token_dim).

Without projection the prefix is an embedding table; with prefix_projection it is
Linear(tanh(Linear(embedding))) (modules created in peft's order, so the same seed gives the same weights).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.methods.prefix_tuning.config import PrefixTuningConfig


class PrefixEncoder(nn.Module):
    """forward() -> the flattened prefix keys/values, (n, L * 2 * D)."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        n, dim, out = config.num_virtual_tokens, config.token_dim, config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            hidden = config.encoder_hidden_size or dim
            self.embedding = nn.Embedding(n, dim)
            self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, out)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight
