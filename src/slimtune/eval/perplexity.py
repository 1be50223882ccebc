"""Perplexity on held-out examples: token-weighted, over the tokens that carry labels.

Examples come from slimtune.data (`tokenize_sample`), so the loss mask is the training one: by default
only assistant tokens count (system and user tokens are context). Perplexity is
exp(sum of token NLLs / number of label tokens) over the whole set, so long answers weigh more than
short ones, exactly as the training loss does; the mean of per-example perplexities would not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.data.collate import SFTCollator
from slimtune.data.tokenize import IGNORE_INDEX


@dataclass
class PerplexityResult:
    perplexity: float
    """exp(loss)."""
    loss: float
    """Mean NLL per label token (nats)."""
    tokens: int
    """Label tokens scored."""
    per_example: list[tuple[float, int]]
    """(summed NLL, label tokens) of each example, in input order."""


@torch.no_grad()
def example_nlls(model: nn.Module, examples: Sequence[dict[str, list[int]]], pad_id: int,
                 batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL in nats, label tokens) per example; labels are shifted inside (HF convention)."""
    collate = SFTCollator(pad_id)
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for start in range(0, len(examples), batch_size):
        batch = collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples[start:start + batch_size]])
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits.float()  # (B, T, V)
        labels = batch["labels"][:, 1:].to(device)  # (B, T-1): token t+1 is predicted at t
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                              reduction="none")  # (B, T-1)
        counts = (labels != IGNORE_INDEX).sum(dim=1)
        out += [(float(s), int(c)) for s, c in zip(nll.sum(dim=1).tolist(), counts.tolist())]
    return out


def perplexity(model: nn.Module, examples: Sequence[dict[str, list[int]]], pad_id: int,
               batch_size: int = 8) -> PerplexityResult:
    """Token-weighted perplexity of `model` on `examples`."""
    per_example = example_nlls(model, examples, pad_id, batch_size)
    tokens = sum(c for _, c in per_example)
    if tokens == 0:
        raise ValueError("no label tokens to score: every example's loss mask is empty")
    loss = sum(s for s, _ in per_example) / tokens
    return PerplexityResult(math.exp(loss), loss, tokens, per_example)
