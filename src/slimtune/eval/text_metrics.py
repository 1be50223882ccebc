"""Generation metrics: BLEU (sacrebleu), ROUGE-1/2/L (rouge-score) and exact match, Chinese-aware.

# Note: CJK-aware tokenization
rouge-score's default tokenizer lowercases and keeps `[a-z0-9]+` runs, so Chinese text becomes no
tokens at all and every Chinese ROUGE is 0. We pass our own tokenizer: each CJK character is a token
(the usual character-level ROUGE for Chinese), every other run of letters/digits is a lowercased
word, punctuation is dropped. BLEU uses sacrebleu's `zh` tokenizer (CJK characters split, the rest
13a) when the references hold CJK text, else the standard `13a`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from slimtune.errors import MissingDependency

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
TOKEN = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+")
"""One CJK character, or a run of letters/digits that holds no CJK character."""
HAS_CJK = re.compile(rf"[{_CJK}]")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def tokenize_mixed(text: str) -> list[str]:
    """Lowercased words, and each CJK character on its own; see Note: CJK-aware tokenization."""
    return TOKEN.findall(text.casefold())


class MixedTokenizer:
    """The object rouge-score calls: `tokenize(text) -> list[str]`."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize_mixed(text)


def normalize(text: str) -> str:
    """What exact match compares: casefolded, whitespace collapsed, ends stripped."""
    return " ".join(text.casefold().split())


def bleu_tokenizer(references: Sequence[str]) -> str:
    """sacrebleu tokenizer for these references: `zh` when any holds CJK text, else `13a`."""
    return "zh" if any(HAS_CJK.search(r) for r in references) else "13a"


@dataclass
class SampleScores:
    """Scores of one hypothesis against its reference (BLEU 0-100, ROUGE F1 0-1, exact match 0/1)."""

    bleu: float
    rouge1: float
    rouge2: float
    rougeL: float
    exact_match: float


@dataclass
class CorpusScores:
    """Corpus BLEU, mean ROUGE F1s and exact-match rate over all samples."""

    bleu: float
    rouge1: float
    rouge2: float
    rougeL: float
    exact_match: float
    bleu_tokenize: str
    samples: list[SampleScores]

    def summary(self) -> dict[str, float]:
        return {"bleu": self.bleu, "rouge1": self.rouge1, "rouge2": self.rouge2, "rougeL": self.rougeL,
                "exact_match": self.exact_match}


def score_corpus(hypotheses: Sequence[str], references: Sequence[str], bleu_tokenize: str | None = None) -> CorpusScores:
    """Score hypotheses against references (one reference each)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must pair up")
    if not references:
        raise ValueError("no samples to score")
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise MissingDependency(f"generation metrics need sacrebleu and rouge-score ({err.name} is missing): "
                                "pip install 'slimtune[eval]'") from None
    tokenize = bleu_tokenize or bleu_tokenizer(references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=MixedTokenizer())
    samples = []
    for hyp, ref in zip(hypotheses, references):
        rouge = scorer.score(ref, hyp)
        bleu = sacrebleu.sentence_bleu(hyp, [ref], tokenize=tokenize).score
        samples.append(SampleScores(bleu, rouge["rouge1"].fmeasure, rouge["rouge2"].fmeasure,
                                    rouge["rougeL"].fmeasure, float(normalize(hyp) == normalize(ref))))
    corpus_bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize).score
    n = len(samples)
    return CorpusScores(
        corpus_bleu, sum(s.rouge1 for s in samples) / n, sum(s.rouge2 for s in samples) / n,
        sum(s.rougeL for s in samples) / n, sum(s.exact_match for s in samples) / n, tokenize, samples)
