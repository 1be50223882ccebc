"""PromptEncoder: P-tuning's reparameterized prompt, (total_virtual_tokens, token_dim).

MLP:  prompt = W3 relu(W2 relu(W1 E))                 E: (n, D) embedding, hidden size h
LSTM: prompt = W2 relu(W1 BiLSTM(E))                  BiLSTM output (n, 2h)
Modules are created in peft's order and under peft's names (embedding, lstm_head, mlp_head), so the same
seed gives the same weights.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from slimtune.methods.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType

_MLP_LAYERS = 2  # peft's default encoder_num_layers; the MLP's depth is fixed


class PromptEncoder(nn.Module):
    """forward() -> the prompt, (total_virtual_tokens, token_dim)."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size or config.token_dim
        self.use_lstm = config.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM
        self.embedding = nn.Embedding(config.total_virtual_tokens, dim)
        if self.use_lstm:
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            if config.encoder_num_layers != _MLP_LAYERS:
                warnings.warn(f"P-tuning MLP: encoder_num_layers={config.encoder_num_layers} is ignored; the MLP has "
                              f"exactly {_MLP_LAYERS} hidden layers", stacklevel=3)
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        embeds = self.embedding.weight
        if self.use_lstm:
            return self.mlp_head(self.lstm_head(embeds.unsqueeze(0))[0]).squeeze(0)  # (1, n, 2h) -> (n, D)
        return self.mlp_head(embeds)
