"""Field checks every adapter config gets before its own cross-checks: types, finite numbers, patterns.

adapter_config.json is JSON from anywhere, and a dataclass keeps whatever it is given: `"use_rslora": "false"`
is a non-empty string, so truthy, and turned rsLoRA on; `lora_alpha: Infinity` scaled every update to inf.
Each field's value must fit its annotation exactly (an int is accepted for a float; a tuple or set for a
list), every number in it must be finite, and fields holding regular expressions must compile
(Note: bounded patterns, targeting.py). Errors name the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from slimtune.targeting import check_pattern

PATTERN_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules")
"""Fields that are a regular expression when they hold a string."""
PATTERN_KEY_FIELDS = ("rank_pattern", "alpha_pattern")
"""Fields whose keys are regular expressions."""


class FieldTypeError(ValueError, TypeError):
    """A field of the wrong type: a TypeError by nature, a ValueError for callers that catch user errors as such."""


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def check_fields(config: Any) -> None:
    """Check every init field of dataclass instance `config` (TypeError / ValueError naming the field)."""
    types_ = _field_types(type(config))
    check_values(type(config), {name: getattr(config, name) for name in types_})


def check_values(cls: type, values: Mapping[str, Any], prefix: str = "") -> None:
    """Check `values` against the fields of dataclass `cls`; unknown keys are the caller's to refuse."""
    types_ = _field_types(cls)
    for name, value in values.items():
        if name not in types_:
            continue
        field = f"{prefix}{name}"
        if not _fits(value, types_[name]):
            _raise_for_entry(field, value, types_[name])
            raise FieldTypeError(f"{field}={value!r} must be {_describe(types_[name])}; got {_kind(value)}")
        bad = _first_nonfinite(value)
        if bad is not None:
            where = "" if bad is value else f" holds {bad!r};"
            raise ValueError(f"{field}={value!r}{where} must be a finite number")
        if name == "target_modules" and isinstance(value, list | tuple | set | frozenset) and not value:
            raise ValueError(f"{field} is empty; name modules (a list), a regex, 'all-linear', or leave it unset "
                             "for the model's defaults")
        if name in PATTERN_FIELDS and isinstance(value, str) and value != "all-linear":
            check_pattern(value, field)
        if name in PATTERN_KEY_FIELDS and isinstance(value, Mapping):
            for key in value:
                check_pattern(key, f"{field} key")


def _raise_for_entry(field: str, value: Any, tp: Any) -> None:
    """Name the first bad entry when `value` is a mapping and `tp` allows a mapping."""
    dict_types = [a for a in (typing.get_args(tp) or (tp,)) if typing.get_origin(a) is dict]
    if not isinstance(value, Mapping) or len(dict_types) != 1 or not typing.get_args(dict_types[0]):
        return
    key_tp, value_tp = typing.get_args(dict_types[0])
    for key, entry in value.items():
        if not _fits(key, key_tp):
            raise FieldTypeError(f"{field}: key {key!r} must be {_describe(key_tp)}; got {_kind(key)}")
        if not _fits(entry, value_tp):
            raise FieldTypeError(f"{field}[{key!r}] must be {_describe(value_tp)}; got {entry!r}")


def _fits(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is list or tp is list:
        return isinstance(value, list | tuple | set | frozenset) and all(_fits(v, args[0] if args else Any)
                                                                         for v in value)
    if origin is dict or tp is dict:
        key_tp, value_tp = args if args else (Any, Any)
        return isinstance(value, Mapping) and all(_fits(k, key_tp) and _fits(v, value_tp) for k, v in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _first_nonfinite(value: Any) -> float | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return next((bad for v in value if (bad := _first_nonfinite(v)) is not None), None)
    return None


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping"}
    if tp in names:
        return names[tp]
    if origin is list:
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], _describe(args[0]))}"
    if origin is dict:
        return f"a mapping of ({_describe(args[0])}) to ({_describe(args[1])})"
    return getattr(tp, "__name__", str(tp))


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
