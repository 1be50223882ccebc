"""Formats -> canonical conversations, from every file type; detection; row errors and skipping."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from slimtune.data import DataConfig, RowError, detect_format, load_samples

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "history": [["Hi", "Hello!"]], "system": "Be brief."},
    {"instruction": "Translate", "input": "chat", "output": "cat"},
]
ALPACA_EXPECTED = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
    [{"role": "user", "content": "Translate", "input": "chat"}, {"role": "assistant", "content": "cat"}],
]
BELLE = [
    {"instruction": "Human: 你好\nAssistant: 你好！有什么可以帮你？\nHuman: 写一句诗\nAssistant:", "input": "", "output": "床前明月光。"},
    {"instruction": "写一句诗", "input": "", "output": "疑是地上霜。"},
]
BELLE_EXPECTED = [
    [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "写一句诗"},
        {"role": "assistant", "content": "床前明月光。"},
    ],
    [{"role": "user", "content": "写一句诗"}, {"role": "assistant", "content": "疑是地上霜。"}],
]
SHAREGPT = [
    {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                       {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]},
]
SHAREGPT_EXPECTED = [[
    {"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"},
]]
MESSAGES = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
MESSAGES_EXPECTED = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
TEXT = [{"text": "Once upon a time."}, {"text": "唐诗三百首"}]

CASES = {
    "alpaca": (ALPACA, ALPACA_EXPECTED),
    "belle": (BELLE, BELLE_EXPECTED),
    "sharegpt": (SHAREGPT, SHAREGPT_EXPECTED),
    "messages": (MESSAGES, MESSAGES_EXPECTED),
    "text": (TEXT, None),
}


def write_rows(folder: Path, rows: list[dict], kind: str) -> Path:
    path = folder / f"rows.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif kind == "csv":
        keys = sorted({k for r in rows for k in r})
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            for r in rows:  # list cells are JSON strings in CSV
                writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in r.items()})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("fmt", list(CASES))
def test_each_format_from_each_file_type(tmp_path, fmt, kind):
    rows, expected = CASES[fmt]
    path = write_rows(tmp_path, rows, kind)
    samples, detected = load_samples(str(path), DataConfig(path=str(path)))
    assert detected == fmt
    if expected is None:
        assert [s.text for s in samples] == [r["text"] for r in rows]
        assert all(s.messages == [] for s in samples)
    else:
        assert [s.messages for s in samples] == expected
    # An explicit format gives the same result.
    explicit, used = load_samples(str(path), DataConfig(path=str(path), format=fmt))
    assert used == fmt and explicit == samples


def test_belle_conversations_form_reads_like_sharegpt(tmp_path):
    row = {"id": "1", "conversations": [{"from": "human", "value": "你好"}, {"from": "assistant", "value": "您好"}]}
    path = write_rows(tmp_path, [row], "jsonl")
    samples, _ = load_samples(str(path), DataConfig(path=str(path), format="belle"))
    assert samples[0].messages == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好"}]


def test_detection_mixed_and_unknown():
    assert detect_format([("f line 1", ALPACA[1]), ("f line 2", BELLE[0])]) == "belle"
    with pytest.raises(ValueError, match=r"f line 2.*cannot detect.*\['answer', 'question'\]"):
        detect_format([("f line 1", ALPACA[1]), ("f line 2", {"question": "q", "answer": "a"})])
    with pytest.raises(ValueError, match="different formats.*alpaca at f line 1.*messages at f line 2"):
        detect_format([("f line 1", ALPACA[1]), ("f line 2", MESSAGES[0])])


def test_explicit_format_is_checked(tmp_path):
    path = write_rows(tmp_path, ALPACA, "jsonl")
    with pytest.raises(RowError) as info:
        load_samples(str(path), DataConfig(path=str(path), format="sharegpt"))
    message = str(info.value)
    assert f"{path} line 1" in message and "'conversations'" in message and "is missing" in message


BAD_ROWS = [
    # (row or raw line, expected fragments of the message)
    ({"instruction": "ok", "output": "fine"}, None),
    ({"instruction": "", "output": "x"}, ["line 2", "'instruction'", "is empty"]),
    ('{"instruction": "broken", ', ["line 3", "not valid JSON"]),
    ({"instruction": "q", "output": 5}, ["line 4", "'output'", "expected a string, got int"]),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, ["line 5", "'history[0]'", "[query, answer] pair"]),
]


def _write_bad(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    lines = [row if isinstance(row, str) else json.dumps(row) for row, _ in BAD_ROWS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_row_stops_with_file_line_field(tmp_path):
    path = _write_bad(tmp_path)
    with pytest.raises(RowError) as info:
        load_samples(str(path), DataConfig(path=str(path), format="alpaca"))
    message = str(info.value)
    assert message.startswith(f"{path} line 2, field 'instruction': is empty")
    assert "skip_bad_rows" in message


def test_skip_bad_rows_counts_and_keeps_reasons(tmp_path):
    path = _write_bad(tmp_path)
    cfg = DataConfig(path=str(path), format="alpaca", skip_bad_rows=True)
    from slimtune.data.validation import SkipLog

    skips = SkipLog()
    samples, _ = load_samples(str(path), cfg, skips)
    assert len(samples) == 1 and skips.rows_read == 5 and skips.count == 4
    for reason, (_, fragments) in zip(skips.reasons, BAD_ROWS[1:], strict=True):
        assert all(fragment in reason for fragment in fragments), reason


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "user", "content": "q"}], "messages[0].role': the last turn must be the assistant's"),
        ([{"role": "assistant", "content": "a"}], "messages[0].role': got 'assistant' where 'user' was expected"),
        ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "unknown role 'bot'; allowed: system, user, assistant"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}], "messages[1].content': is empty"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}],
         "a system turn is only allowed first"),
    ],
)
def test_conversation_validation_messages(tmp_path, messages, fragment):
    path = write_rows(tmp_path, [{"messages": messages}], "jsonl")
    with pytest.raises(RowError) as info:
        load_samples(str(path), DataConfig(path=str(path)))
    assert str(info.value).startswith(f"{path} line 1, field '") and fragment in str(info.value)


def test_sharegpt_unknown_speaker_and_csv_row_index(tmp_path):
    rows = [SHAREGPT[0], {"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    path = write_rows(tmp_path, rows, "csv")
    with pytest.raises(RowError) as info:
        load_samples(str(path), DataConfig(path=str(path)))
    assert str(info.value).startswith(f"{path} row index 1 (line 3), field 'conversations[0].from': unknown speaker 'alien'")


def test_parquet_error_names_row_index(tmp_path):
    path = write_rows(tmp_path, [ALPACA[1], {"instruction": "q", "input": "", "output": ""}], "parquet")
    with pytest.raises(RowError, match=rf"{path.name} row index 1, field 'output': is empty"):
        load_samples(str(path), DataConfig(path=str(path)))


def test_missing_file_unsupported_type_and_max_rows(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_samples(str(tmp_path / "nope.jsonl"), DataConfig())
    other = tmp_path / "rows.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'; allowed: .json, .jsonl, .csv, .parquet"):
        load_samples(str(other), DataConfig())
    path = write_rows(tmp_path, ALPACA * 3, "jsonl")
    samples, _ = load_samples(str(path), DataConfig(path=str(path)), max_rows=4)
    assert len(samples) == 4


def test_hub_names_go_through_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "user/offline":
            raise ConnectionError("no network")
        return [{"instruction": "q", "output": "a"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    samples, fmt = load_samples("user/ok", DataConfig(path="user/ok", hub_subset="zh", hub_split="test"))
    assert calls == [("user/ok", "zh", "test")] and fmt == "alpaca"
    assert samples[0].where == "user/ok[test] row index 0"
    with pytest.raises(ValueError, match=r"'user/offline' is neither an existing file .* ConnectionError: no network"):
        load_samples("user/offline", DataConfig())
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_samples("user/ok", DataConfig())


def test_shipped_datasets_load():
    samples, fmt = load_samples("slimtune:tang300_zh", DataConfig())
    assert fmt == "alpaca" and len(samples) == 120
    assert any("《" in s.messages[0]["content"] for s in samples)
    with pytest.raises(ValueError, match="no shipped dataset 'nope'; available: tang300_zh, wordnet_instruct"):
        load_samples("slimtune:nope", DataConfig())


def test_config_checks():
    with pytest.raises(ValueError, match="data.format='xml' is not allowed"):
        DataConfig(format="xml")
    with pytest.raises(ValueError, match="eval_split=1.5"):
        DataConfig(eval_split=1.5)
    with pytest.raises(ValueError, match="data.template='vicuna' is not allowed"):
        DataConfig(template="vicuna")
    with pytest.raises(ValueError, match="exclude each other"):
        DataConfig(packing=True, group_by_length=True)
