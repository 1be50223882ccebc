"""Reading raw rows: JSON, JSONL, CSV, Parquet files, hub dataset names, and `slimtune:<name>` assets.

Every row comes with `where`, the place a user must look when something is wrong with it: JSONL
"file line N" (1-based), CSV "file row index I (line N)", JSON/Parquet/hub "... row index I"
(0-based, as pandas and datasets show them). A JSONL line that is not JSON is returned as a RowError
(the pipeline stops or skips it), never a bare traceback.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slimtune.data.validation import RowError

FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
BUILTIN_PREFIX = "slimtune:"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class RawRow:
    """One row as read: `data` is the parsed object, or `error` says why it could not be read."""

    where: str
    data: object = None
    error: RowError | None = None


def builtin_dataset_files(path: str) -> tuple[Path, Path | None]:
    """`slimtune:<name>` -> (train file, eval file or None) shipped in slimtune/assets/<name>/."""
    name = path[len(BUILTIN_PREFIX) :]
    folder = ASSETS_DIR / name
    train = folder / "train.jsonl"
    if not train.is_file():
        shipped = sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "train.jsonl").is_file()) if ASSETS_DIR.is_dir() else []
        raise ValueError(f"data.path={path!r}: no shipped dataset {name!r}; available: {', '.join(shipped) or 'none'}")
    eval_file = folder / "eval.jsonl"
    return train, eval_file if eval_file.is_file() else None


def read_rows(path: str, max_rows: int | None = None, hub_split: str = "train", hub_subset: str | None = None) -> list[RawRow]:
    """All rows of `path` (a file, a `slimtune:` dataset or a hub name), at most `max_rows`."""
    if path.startswith(BUILTIN_PREFIX):
        path = str(builtin_dataset_files(path)[0])
    rows = _iter_rows(path, hub_split, hub_subset)
    out: list[RawRow] = []
    for row in rows:
        if max_rows is not None and len(out) >= max_rows:
            break
        out.append(row)
    return out


def _iter_rows(path: str, hub_split: str, hub_subset: str | None) -> Iterator[RawRow]:
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if file.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise ValueError(f"{path}: unsupported file type {suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")
        return readers[suffix](file)
    if suffix in FILE_SUFFIXES or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data file not found: {path}")
    return _read_hub(path, hub_split, hub_subset)


def _read_jsonl(file: Path) -> Iterator[RawRow]:
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{file} line {number}"
            try:
                yield RawRow(where, json.loads(line))
            except json.JSONDecodeError as exc:
                yield RawRow(where, error=RowError(where, "<json>", f"not valid JSON ({exc.msg} at column {exc.colno})"))


def _read_json(file: Path) -> Iterator[RawRow]:
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a JSONL file named .json: read it line by line
            yield from _read_jsonl(file)
            return
        raise ValueError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{file}: a .json data file must hold a list of row objects, got a {type(data).__name__}")
    for index, row in enumerate(data):
        yield RawRow(f"{file} row index {index}", row)


def _read_csv(file: Path) -> Iterator[RawRow]:
    with file.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        start = 2  # line 1 is the header
        for index, row in enumerate(reader):
            where = f"{file} row index {index} (line {start})"
            start = reader.line_num + 1
            if None in row:  # more cells than header names
                yield RawRow(where, error=RowError(where, "<csv>", f"{len(row[None])} more cells than the header has columns"))
                continue
            yield RawRow(where, dict(row))


def _read_parquet(file: Path) -> Iterator[RawRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {file} needs pyarrow: pip install pyarrow (or slimtune[data])") from None
    for index, row in enumerate(pq.read_table(file).to_pylist()):
        yield RawRow(f"{file} row index {index}", row)


def _read_hub(name: str, split: str, subset: str | None) -> Iterator[RawRow]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"data.path={name!r} is not a local file, so it is read as a hub dataset, which needs "
                          "the 'datasets' package: pip install datasets (or slimtune[data])") from None
    try:
        table = datasets.load_dataset(name, name=subset, split=split)
    except Exception as exc:  # network, auth, missing split: all surface as one clear message
        raise ValueError(
            f"data.path={name!r} is neither an existing file ({', '.join(FILE_SUFFIXES)}) nor a loadable hub "
            f"dataset (split={split!r}, subset={subset!r}): {type(exc).__name__}: {exc}"
        ) from exc
    for index, row in enumerate(table):
        yield RawRow(f"{name}[{split}] row index {index}", dict(row))
