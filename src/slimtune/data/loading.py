"""Reading raw rows: JSON, JSONL, CSV, Parquet files, hub dataset names, and `slimtune:<name>` assets.

Every row comes with `where`, the place a user must look when something is wrong with it: JSONL
"file line N" (1-based), CSV "file row index I (line N)", JSON/Parquet/hub "... row index I"
(0-based, as pandas and datasets show them). A JSONL line that is not JSON is returned as a RowError
(the pipeline stops or skips it), never a bare traceback.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slimtune.data.validation import RowError
from slimtune.errors import MissingDependency

FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
BUILTIN_PREFIX = "slimtune:"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class RawRow:
    """One row as read: `data` is the parsed object, or `error` says why it could not be read."""

    where: str
    data: object = None
    error: RowError | None = None


BUILTIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""A shipped dataset's name: one folder under slimtune/assets, never a path."""


def check_builtin_name(path: str, key: str = "data.path") -> None:
    """ValueError unless a `slimtune:<name>` value names a shipped dataset by a plain name (never `../..`)."""
    name = path[len(BUILTIN_PREFIX):]
    if path.startswith(BUILTIN_PREFIX) and not BUILTIN_NAME.fullmatch(name):
        raise ValueError(f"{key}={path!r}: a shipped dataset's name is letters, digits, '_' and '-' (e.g. "
                         f"{BUILTIN_PREFIX}wordnet_instruct), never a path")


def builtin_dataset_files(path: str) -> tuple[Path, Path | None]:
    """`slimtune:<name>` -> (train file, eval file or None) shipped in slimtune/assets/<name>/."""
    check_builtin_name(path)
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
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{file} line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(where, error=RowError(where, "<json>", f"not UTF-8 text (byte {exc.start}: {exc.reason})"))
                continue
            if not line.strip():
                continue
            data, problem = _parse_json(line)
            yield RawRow(where, data) if problem is None else RawRow(where, error=RowError(where, "<json>", problem))


def _parse_json(text: str) -> tuple[object, str | None]:
    """(parsed value, None) or (None, why it is not usable JSON): syntax, nesting depth, huge integers."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    except RecursionError:
        return None, "not usable JSON (nested too deeply)"
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        return None, f"not usable JSON ({exc})"


def _read_json(file: Path) -> Iterator[RawRow]:
    text = _read_text(file)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a JSONL file named .json: read it line by line
            yield from _read_jsonl(file)
            return
        raise ValueError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (RecursionError, ValueError):
        raise ValueError(f"{file}: not usable JSON ({_parse_json(text)[1]})") from None
    if not isinstance(data, list):
        raise ValueError(f"{file}: a .json data file must hold a list of row objects, got a {type(data).__name__}")
    for index, row in enumerate(data):
        yield RawRow(f"{file} row index {index}", row)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None


def _read_csv(file: Path) -> Iterator[RawRow]:
    text = _read_text(file)  # whole file: a decoding error names the file, not a line of Python
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2  # line 1 is the header
    index = 0
    while True:
        where = f"{file} row index {index} (line {start})"
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # NUL bytes, a cell over the csv module's field size limit, ...
            raise ValueError(f"{file} near line {reader.line_num}: not readable CSV ({exc})") from None
        start = reader.line_num + 1
        index += 1
        if None in row:  # more cells than header names
            yield RawRow(where, error=RowError(where, "<csv>", f"{len(row[None])} more cells than the header has columns"))
            continue
        yield RawRow(where, dict(row))


def _read_parquet(file: Path) -> Iterator[RawRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency(f"reading {file} needs pyarrow: pip install pyarrow (or slimtune[data])") from None
    import pyarrow as pa

    try:
        rows = pq.read_table(file).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:  # a damaged or non-Parquet file
        raise ValueError(f"{file}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    for index, row in enumerate(rows):
        yield RawRow(f"{file} row index {index}", row)


def _read_hub(name: str, split: str, subset: str | None) -> Iterator[RawRow]:
    try:
        import datasets
    except ImportError:
        raise MissingDependency(f"data.path={name!r} is not a local file, so it is read as a hub dataset, "
                                "which needs the 'datasets' package: pip install datasets (or slimtune[data])") from None
    try:
        table = datasets.load_dataset(name, name=subset, split=split)
    except Exception as exc:  # network, auth, missing split: all surface as one clear message
        raise ValueError(
            f"data.path={name!r} is neither an existing file ({', '.join(FILE_SUFFIXES)}) nor a loadable hub "
            f"dataset (split={split!r}, subset={subset!r}): {type(exc).__name__}: {exc}"
        ) from exc
    for index, row in enumerate(table):
        yield RawRow(f"{name}[{split}] row index {index}", dict(row))
