"""PromptEmbedding: the learned virtual token embeddings of prompt tuning, (total_virtual_tokens, D).

Construction draws random numbers in peft's order (the embedding's N(0, 1) init first, then SAMPLE_VOCAB's
token ids), so the same seed gives the same prompt as peft.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimtune.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit


def _init_token_ids(config: PromptTuningConfig, vocab_size: int) -> list[int]:
    rows = config.total_virtual_tokens
    if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
        return torch.randint(0, vocab_size, (rows,), dtype=torch.long).tolist()
    from transformers import AutoTokenizer  # TEXT init only

    kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs, trust_remote_code=False)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens with "
                         f"tokenizer {config.tokenizer_name_or_path!r}")
    return (ids * math.ceil(rows / len(ids)))[:rows]  # repeat, then cut to the number of virtual tokens


class PromptEmbedding(nn.Module):
    """forward() -> the prompt, (total_virtual_tokens, token_dim)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.total_virtual_tokens, config.token_dim)
        if config.prompt_tuning_init == PromptTuningInit.RANDOM:
            return
        ids = torch.tensor(_init_token_ids(config, word_embeddings.num_embeddings), dtype=torch.long)
        if int(ids.max()) >= word_embeddings.num_embeddings:
            raise ValueError(f"tokenizer {config.tokenizer_name_or_path!r} gives token id {int(ids.max())} but the "
                             f"model's vocabulary has {word_embeddings.num_embeddings} entries")
        with torch.no_grad():
            rows = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
        self.embedding.weight = nn.Parameter(rows)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight
