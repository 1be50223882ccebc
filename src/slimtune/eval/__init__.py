"""slimtune.eval: perplexity, BLEU/ROUGE/exact match (Chinese-aware), local-judge scoring, reports.

    result = run_eval(EvalConfig(model="base", adapter="runs/a/adapter", data="eval.jsonl", output="eval-out"))

sacrebleu, rouge-score and matplotlib are imported only when used (extra `slimtune[eval]`).
"""

from slimtune.eval.config import EvalConfig
from slimtune.eval.judge import parse_score, parse_verdict
from slimtune.eval.perplexity import PerplexityResult, perplexity
from slimtune.eval.run import EvalResult, run_eval
from slimtune.eval.text_metrics import score_corpus, tokenize_mixed

__all__ = [
    "EvalConfig",
    "EvalResult",
    "PerplexityResult",
    "parse_score",
    "parse_verdict",
    "perplexity",
    "run_eval",
    "score_corpus",
    "tokenize_mixed",
]
