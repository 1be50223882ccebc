"""data.columns and data.roles: a user's column names and role values mapped onto a format's, before
detection, in every file type; errors name file, row and key."""

from __future__ import annotations

import json

import pytest

from slimtune.data import DataConfig, RowError, load_samples
from slimtune.data.validation import SkipLog

QA = [{"question": "Name a colour.", "context": "", "answer": "Blue."},
      {"question": "Translate", "context": "chat", "answer": "cat"}]
QA_EXPECTED = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Translate", "input": "chat"}, {"role": "assistant", "content": "cat"}],
]
CHATS = [{"conversation": [{"speaker": "human", "text": "Hi"}, {"speaker": "bot", "text": "Hello!"}], "id": 1}]
CHATS_EXPECTED = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
CHAT_COLUMNS = {"messages": "conversation", "role": "speaker", "content": "text"}
CHAT_ROLES = {"human": "user", "bot": "assistant"}


def write(path, rows):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_alpaca_fields_from_other_column_names(tmp_path, suffix):
    path = write(tmp_path / f"qa{suffix}", QA)
    cfg = DataConfig(path=str(path), columns={"instruction": "question", "input": "context", "output": "answer"})
    samples, fmt = load_samples(str(path), cfg)
    assert fmt == "alpaca" and [s.messages for s in samples] == QA_EXPECTED


@pytest.mark.parametrize("fmt", ["auto", "messages"])
def test_conversation_list_turn_keys_and_role_values(tmp_path, fmt):
    path = write(tmp_path / "chats.jsonl", CHATS)
    cfg = DataConfig(path=str(path), format=fmt, columns=CHAT_COLUMNS, roles=CHAT_ROLES)
    samples, used = load_samples(str(path), cfg)
    assert used == "messages" and [s.messages for s in samples] == CHATS_EXPECTED


def test_sharegpt_turn_keys_and_prompt_completion_columns(tmp_path):
    rows = [{"dialog": [{"who": "user", "said": "Hi"}, {"who": "model", "said": "Hello!"}]}]
    path = write(tmp_path / "share.jsonl", rows)
    cfg = DataConfig(path=str(path), columns={"conversations": "dialog", "from": "who", "value": "said"})
    samples, fmt = load_samples(str(path), cfg)
    assert fmt == "sharegpt" and [s.messages for s in samples] == CHATS_EXPECTED
    path = write(tmp_path / "pc.jsonl", [{"q": "The sky is", "a": " blue."}])
    samples, fmt = load_samples(str(path), DataConfig(path=str(path), columns={"prompt": "q", "completion": "a"}))
    assert fmt == "prompt_completion" and samples[0].text == "The sky is blue." and samples[0].context_chars == 10


def test_missing_mapped_column_names_file_row_and_key(tmp_path):
    path = write(tmp_path / "qa.jsonl", [QA[0], {"question": "q", "reply": "a"}])
    cfg = DataConfig(path=str(path), columns={"instruction": "question", "output": "answer"})
    with pytest.raises(RowError) as info:
        load_samples(str(path), cfg)
    assert str(info.value).startswith(f"{path} line 2, field 'answer': is missing; data.columns maps it to 'output' "
                                      "(row keys: ['question', 'reply'])")
    skips = SkipLog()
    samples, _ = load_samples(str(path), DataConfig(path=str(path), columns=cfg.columns, skip_bad_rows=True), skips)
    assert len(samples) == 1 and skips.count == 1 and "line 2, field 'answer'" in skips.reasons[0]


def test_missing_turn_key_names_the_turn(tmp_path):
    rows = [{"conversation": [{"speaker": "human", "text": "Hi"}, {"speaker": "bot", "content": "Hello!"}]}]
    path = write(tmp_path / "chats.jsonl", rows)
    with pytest.raises(RowError) as info:
        load_samples(str(path), DataConfig(path=str(path), columns=CHAT_COLUMNS, roles=CHAT_ROLES))
    assert str(info.value).startswith(f"{path} line 1, field 'conversation[1]': has no 'text' key; data.columns "
                                      "maps it to 'content'")


def test_unmapped_role_value_is_named(tmp_path):
    path = write(tmp_path / "chats.jsonl", CHATS)
    with pytest.raises(RowError, match=r"line 1, field 'messages\[1\].role': unknown role 'bot'"):
        load_samples(str(path), DataConfig(path=str(path), columns=CHAT_COLUMNS, roles={"human": "user"}))


def test_config_errors_name_the_key_and_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"data.columns: 'question' is not a field of any format; allowed: instruction"):
        DataConfig(columns={"question": "instruction"})
    with pytest.raises(ValueError, match=r"data.columns.output must name a column .* got 3"):
        DataConfig(columns={"output": 3})
    with pytest.raises(ValueError, match="one column onto two fields"):
        DataConfig(columns={"instruction": "q", "output": "q"})
    with pytest.raises(ValueError, match=r"data.roles.bot must be one of system, user, assistant, got 'robot'"):
        DataConfig(roles={"bot": "robot"})
    path = write(tmp_path / "chats.jsonl", CHATS)
    with pytest.raises(ValueError, match=r"maps onto 'history', which format 'messages' does not have; its fields: "
                                         "messages, role, content"):
        load_samples(str(path), DataConfig(path=str(path), format="messages", columns={**CHAT_COLUMNS, "history": "past"}))
    with pytest.raises(ValueError, match=r"maps onto 'history', which format 'messages' does not have"):
        load_samples(str(path), DataConfig(path=str(path), columns={**CHAT_COLUMNS, "history": "id"}, roles=CHAT_ROLES))
