"""MT-Bench-style judging by a local model: single-answer grading (1-10) and pairwise comparison.

The prompts follow MT-Bench's `single-v1` and `pair-v2` judge prompts (Zheng et al., 2023). Pairwise
judging runs both orders (fine-tuned as A, then as B) because judges favour a position; a sample is a
win when the orders agree (or one says tie), a tie when they disagree. Every prompt, every raw judge
output and every parsed verdict is kept; an output we cannot parse is recorded as unparsed and left
out of the averages, never an error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

JUDGE_SYSTEM = "You are a helpful assistant."

SINGLE_PROMPT = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
    "you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for "
    "example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)

PAIR_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. You should choose the assistant that follows the user's instructions "
    "and answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of "
    "the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective "
    "as possible. After providing your explanation, output your final verdict by strictly following this "
    "format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.\n\n"
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]"
)

_NUM = r"(\d+(?:\.\d+)?)"
SCORE_PATTERNS = (
    re.compile(rf"\[\[\s*{_NUM}\s*(?:/\s*10\s*)?\]\]"),
    re.compile(rf"\[\s*{_NUM}\s*(?:/\s*10\s*)?\]"),
    re.compile(rf"(?:rating|score)\s*(?:is|of)?\s*[:：=]?\s*\**\s*{_NUM}", re.IGNORECASE),
    re.compile(rf"{_NUM}\s*/\s*10\b"),
)
"""Tried in order; the last match of the first pattern that matches wins (verdicts come last)."""
VERDICT_PATTERNS = (
    re.compile(r"\[\[\s*([ABC])\s*\]\]"),
    re.compile(r"(?:final verdict|verdict|winner)\s*(?:is)?\s*[:：]?\s*\**\s*\[?\s*(A|B|C|tie)\b", re.IGNORECASE),
)


def parse_score(text: str) -> float | None:
    """A 1-10 rating from a judge's output ("[[7]]", "[7]", "Rating: 7", "7/10"); None if absent or out of range."""
    for pattern in SCORE_PATTERNS:
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            return value if 1.0 <= value <= 10.0 else None
    return None


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "C" (tie) from a pairwise judge's output; None if absent."""
    for pattern in VERDICT_PATTERNS:
        found = pattern.findall(text)
        if found:
            verdict = found[-1].upper()
            return "C" if verdict == "TIE" else verdict
    return None


def combine_orders(first: str | None, second: str | None) -> str:
    """Outcome for the fine-tuned model from two orders: first has it as A, second as B.
    Returns win | loss | tie | unparsed."""
    def outcome(verdict: str | None, ours: str) -> str | None:
        if verdict is None:
            return None
        return "tie" if verdict == "C" else ("win" if verdict == ours else "loss")

    results = {r for r in (outcome(first, "A"), outcome(second, "B")) if r is not None}
    if not results:
        return "unparsed"
    if len(results) == 1:
        return results.pop()
    if "tie" in results:  # one order decided, the other called a tie
        return (results - {"tie"}).pop()
    return "tie"  # the orders disagree: position bias, not preference


@dataclass
class Judgement:
    """One judge call: the prompt it saw, what it wrote, what we read from it."""

    prompt: str
    output: str
    parsed: float | str | None


def single_prompts(questions: Sequence[str], answers: Sequence[str]) -> list[str]:
    return [SINGLE_PROMPT.format(question=q, answer=a) for q, a in zip(questions, answers)]


def pair_prompts(questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str]) -> list[str]:
    return [PAIR_PROMPT.format(question=q, answer_a=a, answer_b=b) for q, a, b in zip(questions, answers_a, answers_b)]


class Judge:
    """A local judge model (a LoadedModel without adapters), greedy decoding."""

    def __init__(self, loaded, max_new_tokens: int = 256, batch_size: int = 4) -> None:
        self.loaded = loaded
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def ask(self, prompts: Sequence[str]) -> list[str]:
        from slimtune.infer.generation import SamplingOptions, generate, render_chat

        tokenizer = self.loaded.tokenizer
        chat = bool(getattr(tokenizer, "chat_template", None))
        texts = [render_chat(tokenizer, [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": p}])
                 if chat else p for p in prompts]
        options = SamplingOptions(max_new_tokens=self.max_new_tokens)
        return [g.text for g in generate(self.loaded, texts, options, chat=chat, batch_size=self.batch_size)]

    def grade(self, questions: Sequence[str], answers: Sequence[str]) -> list[Judgement]:
        prompts = single_prompts(questions, answers)
        return [Judgement(p, o, parse_score(o)) for p, o in zip(prompts, self.ask(prompts))]

    def compare(self, questions: Sequence[str], ours: Sequence[str], theirs: Sequence[str]) -> list[dict]:
        """Pairwise, both orders; per sample {outcome, first, second} with the two Judgements."""
        first_prompts = pair_prompts(questions, ours, theirs)
        second_prompts = pair_prompts(questions, theirs, ours)
        outputs = self.ask(first_prompts + second_prompts)
        n = len(questions)
        rows = []
        for i in range(n):
            first = Judgement(first_prompts[i], outputs[i], parse_verdict(outputs[i]))
            second = Judgement(second_prompts[i], outputs[n + i], parse_verdict(outputs[n + i]))
            rows.append({"outcome": combine_orders(first.parsed, second.parsed), "first": first, "second": second})
        return rows


def summarize_scores(judgements: Sequence[Judgement]) -> dict[str, float | int | None]:
    scores = [j.parsed for j in judgements if isinstance(j.parsed, float)]
    return {"judge_score": sum(scores) / len(scores) if scores else None,
            "judge_scored": len(scores), "judge_unparsed": len(judgements) - len(scores)}


def summarize_pairs(rows: Sequence[dict]) -> dict[str, float | int | None]:
    counts = {k: sum(1 for r in rows if r["outcome"] == k) for k in ("win", "loss", "tie", "unparsed")}
    decided = counts["win"] + counts["loss"] + counts["tie"]
    win_rate = (counts["win"] + 0.5 * counts["tie"]) / decided if decided else None
    return {**counts, "win_rate": win_rate}
