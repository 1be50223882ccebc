"""Fuzzing the data loaders (JSONL, JSON, CSV, Parquet; every row format) with hypothesis.

Each generated file ends in either a list of valid samples (every conversation alternates user/assistant
after an optional system turn, every content a non-empty string) or a ValueError that names the file;
never another exception type, a hang, or a sample that breaks those rules. `skip_bad_rows: true` turns
every row-level problem into a counted skip instead.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from reliability_tools import count, fuzz_settings, time_limit

from slimtune.data.config import DataConfig
from slimtune.data.formats import Sample
from slimtune.data.pipeline import load_samples
from slimtune.data.validation import ROLES, SkipLog

FORMATS = ["auto", "alpaca", "belle", "sharegpt", "messages", "text"]
ODD_TEXT = st.sampled_from(["", " ", "\n", "\x00", "\ud7ff", "\u202e", "\ufeff", "é", "床前明月光", "🦙" * 3,
                            "Human: hi\nAssistant:", "Human：你好\nAssistant：", "a" * 20_000, "\r\n", "\\u0000",
                            "null", "[1, 2]", '{"a": 1}', "NaN"])
TEXT = st.one_of(st.text(max_size=40), ODD_TEXT)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)
ROLE = st.one_of(st.sampled_from([*ROLES, "human", "gpt", "tool", "", "USER"]), VALUE)
TURN_MESSAGES = st.fixed_dictionaries({"role": ROLE, "content": st.one_of(TEXT, VALUE)})
TURN_SHAREGPT = st.fixed_dictionaries({"from": st.one_of(st.sampled_from(["human", "gpt", "system", "bot"]), VALUE),
                                       "value": st.one_of(TEXT, VALUE)})


def _maybe_drop(d: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    """A row, with some keys dropped and some junk keys added."""
    return st.tuples(d, st.sets(st.sampled_from(["instruction", "output", "input", "messages", "conversations",
                                                 "text", "system", "history", "role"])),
                     st.dictionaries(TEXT, VALUE, max_size=2)).map(
        lambda t: {**{k: v for k, v in t[0].items() if k not in t[1]}, **t[2]})


ROW = st.one_of(
    _maybe_drop(st.fixed_dictionaries({"instruction": st.one_of(TEXT, VALUE), "output": st.one_of(TEXT, VALUE)},
                                      optional={"input": st.one_of(TEXT, VALUE), "system": st.one_of(TEXT, VALUE),
                                                "history": st.one_of(st.lists(st.lists(TEXT, max_size=3), max_size=3),
                                                                     VALUE)})),
    _maybe_drop(st.fixed_dictionaries({"messages": st.one_of(st.lists(TURN_MESSAGES, max_size=5), VALUE)})),
    _maybe_drop(st.fixed_dictionaries({"conversations": st.one_of(st.lists(TURN_SHAREGPT, max_size=5), VALUE)},
                                      optional={"system": st.one_of(TEXT, VALUE)})),
    _maybe_drop(st.fixed_dictionaries({"text": st.one_of(TEXT, VALUE)})),
    VALUE,
)
ROWS = st.lists(ROW, min_size=0, max_size=6)


def _check(path: Path, fmt: str, skip: bool, target: str) -> None:
    """Load `path`; a ValueError naming the file, or samples that obey the canonical-conversation rules."""
    count(target)
    cfg = DataConfig(path=str(path), format=fmt, skip_bad_rows=skip)
    skips = SkipLog()
    try:
        with time_limit(20):
            samples, used = load_samples(str(path), cfg, skips)
    except ValueError as err:
        assert path.name in str(err) or "format" in str(err), f"error does not name the file: {err}"
        assert not skip or "skip" not in str(err) or "format" in str(err)
        return
    assert used in FORMATS[1:]
    for sample in samples:
        _check_sample(sample)
    assert len(samples) + skips.count <= skips.rows_read


def _check_sample(sample: Sample) -> None:
    assert isinstance(sample, Sample) and isinstance(sample.where, str)
    if sample.text is not None:
        assert isinstance(sample.text, str) and sample.text.strip()
        return
    roles = [m["role"] for m in sample.messages]
    body = roles[1:] if roles[0] == "system" else roles
    assert body and body == ["user", "assistant"] * (len(body) // 2), roles
    for m in sample.messages:
        assert isinstance(m["content"], str) and m["content"].strip()
        assert set(m) <= {"role", "content", "input"}


@given(rows=ROWS, fmt=st.sampled_from(FORMATS), skip=st.booleans(), broken=st.lists(
    st.sampled_from(['{"instruction": "a", ', "[1, 2", "\x00\x01", "{}", "nul\x00l", "[" * 5000, '"x"', "1e999",
                     '{"text": "' + "x" * 50 + '"}' * 2, "\udcff"]), max_size=2))
@fuzz_settings(150)
def test_fuzz_jsonl(tmp_path_factory: pytest.TempPathFactory, rows: list, fmt: str, skip: bool,
                    broken: list[str]) -> None:
    path = tmp_path_factory.mktemp("jsonl") / "rows.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + broken
    path.write_bytes("\n".join(lines).encode("utf-8", errors="surrogateescape"))
    _check(path, fmt, skip, "data_jsonl")


@given(rows=st.one_of(ROWS, VALUE), fmt=st.sampled_from(FORMATS), skip=st.booleans(),
       cut=st.one_of(st.none(), st.integers(0, 200)))
@fuzz_settings(120)
def test_fuzz_json(tmp_path_factory: pytest.TempPathFactory, rows: object, fmt: str, skip: bool,
                   cut: int | None) -> None:
    path = tmp_path_factory.mktemp("json") / "rows.json"
    text = json.dumps(rows, ensure_ascii=False)
    path.write_text(text if cut is None else text[:cut], encoding="utf-8", errors="surrogatepass")
    _check(path, fmt, skip, "data_json")


CELL = st.one_of(TEXT, st.sampled_from(['[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]',
                                        '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]',
                                        "[[", "x" * 200_000, "\x00", '"', "a,b\nc"]))


@given(header=st.lists(st.sampled_from(["instruction", "output", "input", "messages", "conversations", "text",
                                        "system", "history", "", "extra"]), min_size=0, max_size=5),
       cells=st.lists(st.lists(CELL, max_size=7), max_size=5), fmt=st.sampled_from(FORMATS), skip=st.booleans(),
       raw_tail=st.sampled_from(["", '"unclosed,quote\n', "a,b,c,d,e,f,g,h\n", "\x00\n", "\xff\n"]))
@fuzz_settings(150)
def test_fuzz_csv(tmp_path_factory: pytest.TempPathFactory, header: list[str], cells: list[list[str]], fmt: str,
                  skip: bool, raw_tail: str) -> None:
    path = tmp_path_factory.mktemp("csv") / "rows.csv"
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(cells)
    path.write_bytes((out.getvalue() + raw_tail).encode("utf-8", errors="surrogateescape").replace(
        b"\xc3\xbf\n", b"\xff\n"))
    _check(path, fmt, skip, "data_csv")


@given(rows=st.lists(st.one_of(
    st.fixed_dictionaries({"instruction": st.one_of(st.none(), TEXT), "output": st.one_of(st.none(), TEXT)}),
    st.fixed_dictionaries({"text": st.one_of(st.none(), TEXT)}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from([*ROLES, "x"]),
                                                                       "content": TEXT}), max_size=4)})),
    min_size=1, max_size=5), fmt=st.sampled_from(FORMATS), skip=st.booleans(),
    corrupt=st.one_of(st.none(), st.integers(0, 400)))
@fuzz_settings(60)
def test_fuzz_parquet(tmp_path_factory: pytest.TempPathFactory, rows: list[dict], fmt: str, skip: bool,
                      corrupt: int | None) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("parquet") / "rows.parquet"
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # rows pyarrow itself cannot hold in one table
        return
    pq.write_table(table, path)
    if corrupt is not None:  # flip bytes at an offset (header, data or footer)
        data = bytearray(path.read_bytes())
        i = corrupt % len(data)
        data[i : i + 8] = b"\xde\xad\xbe\xef" * 2
        path.write_bytes(bytes(data[: len(data) - (corrupt % 3)]))
    _check(path, fmt, skip, "data_parquet")


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xff\xfe\x00\x00", b"[" * 100_000, b"\x00" * 64])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_degenerate_files(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(content)
    _check(path, "auto", False, "data_degenerate")
