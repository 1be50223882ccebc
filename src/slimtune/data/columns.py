"""Column mapping: a user's field names -> a format's field names, before detection and conversion.

`data.columns` maps a format's field name to the user's name for it, as LLaMA-Factory's
dataset_info.json "columns" does: `{instruction: question, output: answer}` reads a row
`{"question": ..., "answer": ...}` as alpaca. Turn-level names (role, content for messages and
prompt_completion turns; from, value for sharegpt turns) rename keys inside every turn of the row's
turn lists. `data.roles` maps role values: `{human: user, bot: assistant}` (LLaMA-Factory's "tags").
A mapped column missing from a row is that row's error (file, line/row, key), like every data error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from slimtune.data.validation import ROLES, RowError

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "belle": ("instruction", "input", "output", "conversations", "from", "value"),
    "sharegpt": ("conversations", "system", "from", "value"),
    "messages": ("messages", "role", "content"),
    "prompt_completion": ("prompt", "completion", "role", "content"),
    "text": ("text",),
}
"""Field names of each format that data.columns may map onto (turn-level names included)."""

TURN_FIELDS = ("role", "content", "from", "value")
"""Names of keys inside a turn; every other field name is a top-level key of a row."""
TURN_LISTS = ("messages", "conversations", "prompt", "completion")
"""Top-level fields that may hold a list of turns."""
ROLE_KEYS = ("role", "from")
"""Keys of a turn whose value is a speaker, renamed by data.roles."""
ALL_FIELDS = tuple(dict.fromkeys(name for names in FORMAT_FIELDS.values() for name in names))


def check_columns(columns: Mapping[str, str], roles: Mapping[str, str]) -> None:
    """ValueError unless data.columns maps known field names to column names and data.roles maps
    strings to canonical roles."""
    for target, source in columns.items():
        if target not in ALL_FIELDS:
            raise ValueError(f"data.columns: {target!r} is not a field of any format; allowed: {', '.join(ALL_FIELDS)} "
                             "(write {format_field: your_column})")
        if not isinstance(source, str) or not source:
            raise ValueError(f"data.columns.{target} must name a column of your data (a string), got {source!r}")
    sources = list(columns.values())
    if len(set(sources)) != len(sources):
        raise ValueError(f"data.columns maps one column onto two fields: {dict(columns)}")
    for value, role in roles.items():
        if not isinstance(value, str) or role not in ROLES:
            raise ValueError(f"data.roles.{value} must be one of {', '.join(ROLES)}, got {role!r}")


def check_columns_for_format(columns: Mapping[str, str], fmt: str) -> None:
    """ValueError if data.columns maps onto a field that format `fmt` does not have."""
    for target in columns:
        if target not in FORMAT_FIELDS[fmt]:
            raise ValueError(f"data.columns maps onto {target!r}, which format {fmt!r} does not have; its fields: "
                             f"{', '.join(FORMAT_FIELDS[fmt])}")


def map_row(row: object, columns: Mapping[str, str], roles: Mapping[str, str], where: str) -> object:
    """`row` with mapped columns renamed to the format's names and role values mapped; rows that are
    not objects pass through (conversion names their problem)."""
    if not isinstance(row, dict) or not (columns or roles):
        return row
    out = dict(row)
    for target, source in columns.items():
        if target in TURN_FIELDS:
            continue
        if source not in out:
            raise RowError(where, source, f"is missing; data.columns maps it to {target!r} (row keys: {sorted(row)})")
        out[target] = out.pop(source)
    turn_renames = {target: source for target, source in columns.items() if target in TURN_FIELDS}
    for key in TURN_LISTS:
        turns = _turn_list(out.get(key))
        if turns is not None:
            name = columns.get(key, key)  # the user's column name, which they will look for in the file
            out[key] = [_map_turn(turn, turn_renames, roles, where, f"{name}[{i}]") for i, turn in enumerate(turns)]
    return out


def _turn_list(value: object) -> list | None:
    """A list of turns, decoding the JSON string a CSV cell holds; None if `value` is not one."""
    if hasattr(value, "tolist"):  # numpy arrays from pandas-backed readers
        value = value.tolist()
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, list) else None


def _map_turn(turn: object, renames: Mapping[str, str], roles: Mapping[str, str], where: str, name: str) -> object:
    if not isinstance(turn, dict):
        return turn
    out = dict(turn)
    for target, source in renames.items():
        if source not in out:
            raise RowError(where, name, f"has no {source!r} key; data.columns maps it to {target!r} "
                                        f"(turn keys: {sorted(turn)})")
        out[target] = out.pop(source)
    for key in ROLE_KEYS:
        if isinstance(out.get(key), str) and out[key] in roles:
            out[key] = roles[out[key]]
    return out
