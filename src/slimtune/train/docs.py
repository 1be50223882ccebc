"""Per-field help of config dataclasses, read from their source: the string literal under each field.

Python drops attribute docstrings at runtime, so we read them back with `ast` (falling back to PEFT-style
`field(metadata={"help": ...})`). This is what turns config docstrings into `slimtune train --help`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """{field name: one-paragraph help} for dataclass `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_docstrings_from_source(klass))
    for f in dataclasses.fields(cls):
        help_ = f.metadata.get("help") if f.metadata else None
        if f.name not in docs and help_:
            docs[f.name] = " ".join(str(help_).split())
    return docs


def _docstrings_from_source(klass: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_fields(cls: type, section: str) -> list[tuple[str, str, str]]:
    """Rows (key, default, help) for every init field of `cls`, keys prefixed with `section.`."""
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        key = f"{section}.{f.name}" if section else f.name
        rows.append((key, _default(f), docs.get(f.name, "")))
    return rows


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if hasattr(value, "value") and isinstance(value.value, str):
        return value.value
    return str(list(value) if isinstance(value, tuple) else value)
