"""Row validation: the error type every data problem raises, the canonical-conversation checks, and
the bookkeeping of skipped rows when `skip_bad_rows` is on.

A RowError always says where (file + 1-based line for JSONL, or row index), which field, what was
found and what is allowed, so a user can open the file at the right place and fix it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
MAX_REASONS = 5
"""How many skip reasons a report keeps (the count is always exact)."""


class RowError(ValueError):
    """A data row that cannot be used. `where` is e.g. "data.jsonl line 7" or "data.csv row 3"."""

    def __init__(self, where: str, field_name: str, problem: str) -> None:
        self.where = where
        self.field_name = field_name
        self.problem = problem
        super().__init__(f"{where}, field {field_name!r}: {problem}")


@dataclass
class SkipLog:
    """Counts rows read and skipped, and keeps the first few skip reasons for the report."""

    rows_read: int = 0
    count: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, error: RowError) -> None:
        self.count += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(str(error))


def check_text(value: object, where: str, field_name: str, allow_empty: bool = False) -> str:
    """`value` as a string, or a RowError saying a string was expected."""
    if not isinstance(value, str):
        raise RowError(where, field_name, f"expected a string, got {type(value).__name__} {_short(value)}")
    if not allow_empty and not value.strip():
        raise RowError(where, field_name, "is empty; a non-empty string is required")
    if (found := _LONE_SURROGATE.search(value)) is not None:  # JSON's "\ud800" decodes to one; no tokenizer takes it
        raise RowError(where, field_name, f"holds a lone surrogate U+{ord(found.group()):04X} at character "
                                          f"{found.start()}; text must be valid Unicode")
    return value


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def validate_conversation(messages: list[dict[str, str]], where: str) -> None:
    """Check a canonical conversation: known roles, non-empty content, an optional leading system
    turn, then user/assistant alternating, starting with user and ending with assistant."""
    if not messages:
        raise RowError(where, "messages", "the conversation is empty")
    start = 1 if messages[0]["role"] == "system" else 0
    body = messages[start:]
    if not body:
        raise RowError(where, "messages", "only a system turn; at least one user and one assistant turn are needed")
    for i, turn in enumerate(messages):
        role = turn["role"]
        if role not in ROLES:
            raise RowError(where, f"messages[{i}].role", f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
        check_text(turn["content"], where, f"messages[{i}].content")
        if role == "system" and i != 0:
            raise RowError(where, f"messages[{i}].role", "a system turn is only allowed first")
    for j, turn in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise RowError(
                where,
                f"messages[{start + j}].role",
                f"got {turn['role']!r} where {expected!r} was expected; turns must alternate "
                "user/assistant after an optional first system turn",
            )
    if body[-1]["role"] != "assistant":
        raise RowError(where, f"messages[{len(messages) - 1}].role", "the last turn must be the assistant's")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
