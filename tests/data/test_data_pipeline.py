"""build_datasets end to end (shipped data, eval split, packing, system prompt) and inspect_data."""

from __future__ import annotations

import json

import pytest

from slimtune.data import IGNORE_INDEX, DataConfig, build_datasets, inspect_data
from slimtune.data.inspect import marked_spans


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


ROWS = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."} for i in range(40)]


def test_shipped_wordnet_dataset(chatml_tok):
    data = build_datasets(DataConfig(max_rows=100), chatml_tok, 256, seed=0)
    s = data.stats
    assert (s.format, s.template, s.rows_read, s.rows_skipped) == ("alpaca", "tokenizer", 300, 0)
    assert (s.train_examples, s.eval_examples, s.truncated_rows) == (100, 200, 0)
    assert 0.1 < s.loss_fraction < 0.9 and s.total_tokens == sum(len(e["input_ids"]) for e in data.train)
    trained = [t for t, on in marked_spans(data.train[0], chatml_tok) if on]
    assert len(trained) == 1 and trained[0].endswith("<|im_end|>\n")


def test_eval_split_is_held_out_and_seeded(tmp_path, plain_tok):
    path = _write(tmp_path / "rows.jsonl", ROWS)
    cfg = DataConfig(path=str(path), eval_split=0.1)
    a = build_datasets(cfg, plain_tok, 128, seed=1)
    b = build_datasets(cfg, plain_tok, 128, seed=1)
    c = build_datasets(cfg, plain_tok, 128, seed=2)
    assert (len(a.train), len(a.eval)) == (36, 4)
    assert a.train == b.train and a.eval == b.eval and a.eval != c.eval
    train_ids = {tuple(e["input_ids"]) for e in a.train}
    assert not any(tuple(e["input_ids"]) in train_ids for e in a.eval)


def test_packing_and_system_prompt(tmp_path, chatml_tok):
    path = _write(tmp_path / "rows.jsonl", ROWS)
    cfg = DataConfig(path=str(path), eval_split=0, packing=True, system_prompt="You add numbers.")
    data = build_datasets(cfg, chatml_tok, 128, seed=0)
    assert data.stats.packed_rows == len(data.train) < data.stats.train_examples == 40
    assert all(len(r["input_ids"]) <= 128 and "position_ids" in r for r in data.train)
    assert sum(len(r["seq_lens"]) for r in data.train) == 40
    first = chatml_tok.decode(data.unpacked_train[0]["input_ids"])
    assert first.startswith("<|im_start|>system\nYou add numbers.<|im_end|>\n<|im_start|>user\nWhat is ")
    loss = sum(1 for r in data.train for lab in r["labels"] if lab != IGNORE_INDEX)
    assert loss == data.stats.loss_tokens  # packing masks only labels that were never used


def test_inspect_report(tmp_path, plain_tok):
    rows = ROWS[:4] + [{"instruction": "", "output": "x"}, '{"broken": ']
    path = _write(tmp_path / "rows.jsonl", rows)
    report = inspect_data(DataConfig(path=str(path), eval_split=0, skip_bad_rows=True, shuffle=False), plain_tok, 512)
    text = report.render()
    assert "rows read: 6   skipped: 2" in text
    assert "line 5, field 'instruction': is empty" in text and "line 6, field '<json>': not valid JSON" in text
    assert "examples: train 4, eval 0" in text
    lengths = report.stats.length_summary()
    assert f"min {lengths['min']}, mean {lengths['mean']:.1f}, p95 {lengths['p95']}, max {lengths['max']}" in text
    assert "### Response:\n⟦It is 0.</s>⟧" in text  # the trained span, end-of-turn token included
    assert "### Instruction:\nWhat is 0 plus 0?" in text and "⟦What" not in text
    assert "### Response:\n[bold green]It is 0.</s>[/]" in report.render(markup=True)


def test_no_usable_rows_and_bad_row_default(tmp_path, plain_tok):
    path = _write(tmp_path / "rows.jsonl", [{"instruction": "", "output": "x"}])
    with pytest.raises(ValueError, match=r"rows.jsonl line 1, field 'instruction': is empty.*skip_bad_rows"):
        build_datasets(DataConfig(path=str(path)), plain_tok, 64, seed=0)
    with pytest.raises(ValueError, match=r"no usable training rows \(1 read, 1 skipped\)"):
        build_datasets(DataConfig(path=str(path), skip_bad_rows=True), plain_tok, 64, seed=0)
    path = _write(tmp_path / "rows.jsonl", ROWS[:3])
    with pytest.raises(ValueError, match=r"all 3 training examples lost every loss-bearing token .* max_seq_len=8"):
        build_datasets(DataConfig(path=str(path), eval_split=0), plain_tok, 8, seed=0)
