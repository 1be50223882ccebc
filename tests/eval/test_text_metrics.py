"""BLEU / ROUGE / exact match: Chinese scored by characters, English by words, values checked by hand."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from slimtune.eval.text_metrics import bleu_tokenizer, normalize, score_corpus, tokenize_mixed


def test_tokenize_mixed_splits_cjk_characters_and_keeps_words():
    assert tokenize_mixed("床前明月光，Hello World-2!") == ["床", "前", "明", "月", "光", "hello", "world", "2"]
    assert tokenize_mixed("GPU上的LoRA微调") == ["gpu", "上", "的", "lora", "微", "调"]


def test_default_rouge_tokenizer_drops_chinese_ours_does_not():
    default = rouge_scorer.RougeScorer(["rouge1"])
    assert default.score("床前明月光", "床前明月光")["rouge1"].fmeasure == 0.0  # the bug we work around
    scores = score_corpus(["床前明月光"], ["床前明月光"])
    assert scores.rouge1 == pytest.approx(1.0)


def test_chinese_rouge_by_characters():
    # reference 5 chars, hypothesis 4 of them + 1 other: unigram P = R = 4/5
    scores = score_corpus(["床前明月霜"], ["床前明月光"])
    assert scores.rouge1 == pytest.approx(0.8)
    # bigrams: ref {床前, 前明, 明月, 月光}, hyp {床前, 前明, 明月, 月霜}: 3/4
    assert scores.rouge2 == pytest.approx(0.75)
    assert scores.rougeL == pytest.approx(0.8)
    assert scores.bleu_tokenize == "zh"


def test_english_rouge_matches_rouge_score_default():
    hyp, ref = "the cat sat on the mat today", "the cat is on the mat"
    default = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(ref, hyp)
    ours = score_corpus([hyp], [ref])
    assert ours.rouge1 == pytest.approx(default["rouge1"].fmeasure)
    assert ours.rouge2 == pytest.approx(default["rouge2"].fmeasure)
    assert ours.rougeL == pytest.approx(default["rougeL"].fmeasure)
    assert ours.bleu_tokenize == "13a"


def test_bleu_and_exact_match_values():
    import sacrebleu

    hyps = ["A small domesticated feline.", "the dog ran"]
    refs = ["a small  domesticated feline.", "the dog ran to the tree"]
    scores = score_corpus(hyps, refs)
    assert scores.exact_match == pytest.approx(0.5)  # case and spacing are normalized
    assert [s.exact_match for s in scores.samples] == [1.0, 0.0]
    assert scores.bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score)
    assert score_corpus(["same words here ok"], ["same words here ok"]).bleu == pytest.approx(100.0)


def test_bleu_tokenizer_choice_and_normalize():
    assert bleu_tokenizer(["hello", "世界"]) == "zh"
    assert bleu_tokenizer(["hello", "world"]) == "13a"
    assert normalize("  Hello\n  World ") == "hello world"


def test_mismatched_lengths_are_a_clear_error():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        score_corpus(["a", "b"], ["a"])
