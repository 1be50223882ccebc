"""Judge output parsing (scores and pairwise verdicts), order combination and summaries."""

from __future__ import annotations

import pytest

from slimtune.eval.judge import (
    PAIR_PROMPT,
    SINGLE_PROMPT,
    Judgement,
    combine_orders,
    pair_prompts,
    parse_score,
    parse_verdict,
    single_prompts,
    summarize_pairs,
    summarize_scores,
)


@pytest.mark.parametrize("text, expected", [
    ("The answer is fine. Rating: [[7]]", 7.0),
    ("[[8.5]]", 8.5),
    ("Rating: [[ 9 ]]", 9.0),
    ("I give it [6].", 6.0),
    ("Rating: 7", 7.0),
    ("score: **4**", 4.0),
    ("Overall 3/10.", 3.0),
    ('Follow the format "Rating: [[5]]". My verdict: [[2]]', 2.0),  # the last verdict wins
    ("[[2]] then [7]", 2.0),  # [[x]] outranks [x]
    ("Rating: [[11]]", None),  # out of range
    ("[[0]]", None),
    ("It is a good answer.", None),
    ("", None),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("A is more detailed. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Both equal: [[C]]", "C"),
    ("Final verdict: B", "B"),
    ("verdict: tie", "C"),
    ("I cannot decide.", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("first, second, outcome", [
    ("A", "B", "win"),  # ours is A first, B second: preferred both times
    ("B", "A", "loss"),
    ("A", "A", "tie"),  # position bias: the orders disagree
    ("C", "C", "tie"),
    ("A", "C", "win"),
    ("C", "A", "loss"),
    (None, "B", "win"),
    (None, None, "unparsed"),
])
def test_combine_orders(first, second, outcome):
    assert combine_orders(first, second) == outcome


def test_prompts_hold_question_and_answers():
    [single] = single_prompts(["What is 2+2?"], ["4"])
    assert single == SINGLE_PROMPT.format(question="What is 2+2?", answer="4")
    assert "[Question]\nWhat is 2+2?" in single and "[[rating]]" in single
    [pair] = pair_prompts(["q"], ["ours"], ["theirs"])
    assert pair == PAIR_PROMPT.format(question="q", answer_a="ours", answer_b="theirs")
    assert pair.index("ours") < pair.index("theirs")


def test_summaries():
    judged = [Judgement("p", "[[8]]", 8.0), Judgement("p", "?", None), Judgement("p", "[[4]]", 4.0)]
    assert summarize_scores(judged) == {"judge_score": 6.0, "judge_scored": 2, "judge_unparsed": 1}
    rows = [{"outcome": o} for o in ("win", "win", "tie", "loss", "unparsed")]
    assert summarize_pairs(rows) == {"win": 2, "loss": 1, "tie": 1, "unparsed": 1, "win_rate": 2.5 / 4}
