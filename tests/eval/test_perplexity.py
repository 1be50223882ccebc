"""Perplexity: equals exp(HF's mean label loss), token-weighted over examples, padding-invariant."""

from __future__ import annotations

import math

import pytest
import torch

from slimtune.eval.perplexity import perplexity

IGNORE = -100


def _examples():
    # two examples of different lengths; the first has only its last 3 tokens labelled
    a = [5, 9, 17, 30, 44, 12, 8, 3]
    b = [7, 21, 33, 40]
    return [{"input_ids": a, "labels": [IGNORE] * 5 + a[5:]}, {"input_ids": b, "labels": list(b)}]


def test_matches_transformers_loss_on_one_example(loaded):
    model = loaded.model.get_base_model()
    ex = _examples()[0]
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.item()
    result = perplexity(model, [ex], pad_id=0)
    assert result.tokens == 3  # labels[5:], predicted from positions 4..6
    assert result.loss == pytest.approx(hf, rel=1e-5)


def test_token_weighted_not_mean_of_examples(loaded):
    model = loaded.model.get_base_model()
    exs = _examples()
    single = [perplexity(model, [e], pad_id=0) for e in exs]
    both = perplexity(model, exs, pad_id=0, batch_size=2)
    total = sum(r.loss * r.tokens for r in single)
    assert both.tokens == sum(r.tokens for r in single)
    assert both.loss == pytest.approx(total / both.tokens, rel=1e-5)
    assert both.perplexity == pytest.approx(math.exp(both.loss))
    mean_of_ppl = sum(r.perplexity for r in single) / 2
    assert abs(both.perplexity - mean_of_ppl) > 1e-3
    # padding the shorter example in a batch of 2 changes nothing
    assert [n for n, _ in both.per_example] == pytest.approx([r.per_example[0][0] for r in single], rel=1e-5)


def test_no_label_tokens_is_an_error(loaded):
    with pytest.raises(ValueError, match="no label tokens"):
        perplexity(loaded.model.get_base_model(), [{"input_ids": [4, 5], "labels": [IGNORE, IGNORE]}], pad_id=0)
