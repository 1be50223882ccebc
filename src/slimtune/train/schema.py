"""Build typed config dataclasses from plain YAML values, with errors that name the bad key.

`from_mapping(cls, values, section)` checks every key against the dataclass fields (unknown keys get the
closest valid name via difflib), coerces YAML scalars to the annotated type (PyYAML reads `1e-4` as a
string: a float field accepts it), and then calls the constructor so `__post_init__` cross-checks run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal


class UnknownKeyError(ValueError):
    """A key no config section has; `suggestion` is the closest valid key, None if nothing is close."""

    def __init__(self, key: str, section: str, suggestion: str | None, allowed: list[str]) -> None:
        where = f"section '{section}'" if section else "the top level"
        hint = f"; did you mean '{suggestion}'?" if suggestion else f"; allowed: {', '.join(sorted(allowed))}"
        super().__init__(f"unknown key '{key}' in {where}{hint}")
        self.key, self.section, self.suggestion, self.allowed = key, section, suggestion, allowed

    @property
    def dotted(self) -> str:
        """The key as a `--section.key` override spells it (without the dashes)."""
        return f"{self.section}.{self.key}" if self.section else self.key


def check_keys(keys: Iterable[str], allowed: Iterable[str], section: str) -> None:
    """Raise UnknownKeyError for the first key not in `allowed`, suggesting the closest valid one."""
    allowed = list(allowed)
    for key in keys:
        if key not in allowed:
            raise UnknownKeyError(str(key), section, closest_key(str(key), allowed), allowed)


# Names that transformers' TrainingArguments, TRL and peft users write (and on/off switches a list key
# holds: tensorboard is a name in report_to), and the key slimtune spells them with; a name is suggested
# only where the section has that key.
OTHER_TRAINERS_NAMES: dict[str, str] = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum", "max_length": "max_seq_len",
    "max_seq_length": "max_seq_len", "save_steps": "save_every", "logging_steps": "log_every",
    "eval_steps": "eval_every", "save_total_limit": "keep_checkpoints", "lr_scheduler_type": "scheduler",
    "warmup": "warmup_steps", "bf16": "precision", "fp16": "precision", "lora_r": "r", "rank": "r",
    "lora_rank": "r", "tensorboard": "report_to", "wandb": "report_to", "mlflow": "report_to",
}  # fmt: skip


def closest_key(key: str, allowed: list[str]) -> str | None:
    """The valid key `key` most likely meant: the name other trainers give it (OTHER_TRAINERS_NAMES:
    `save_every` for save_steps), else the longest key that abbreviates it word by word (`lr` for
    learning_rate, `grad_accum` for gradient_accumulation_steps), else the closest spelling by difflib
    (`max_seq_len` for max_seq_lenght)."""
    if OTHER_TRAINERS_NAMES.get(key) in allowed:
        return OTHER_TRAINERS_NAMES[key]
    short = [a for a in allowed if _abbreviates(a, key)]
    if short:
        return max(short, key=len)
    close = difflib.get_close_matches(key, allowed, n=1)
    return close[0] if close else None


def _abbreviates(short: str, long: str) -> bool:
    """`short` is the initials of `long`'s words, or each of its words starts one of `long`'s words, in order."""
    words = long.lower().split("_")
    if short == long or not short:
        return False
    if len(words) > 1 and short == "".join(w[:1] for w in words):
        return True
    parts, matched = short.split("_"), 0
    for word in words:
        part = parts[matched] if matched < len(parts) else ""
        if part and word.startswith(part) and (len(part) > 1 or part == word):  # 'r' stands for r, not rate
            matched += 1
    return matched == len(parts)


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotation of each init field of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def from_mapping(cls: type, values: Mapping[str, Any] | None, section: str) -> Any:
    """Instantiate dataclass `cls` from `values`, validating keys and types; `section` names it in errors."""
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ValueError(f"section '{section}' must be a mapping of keys to values, got {values!r}")
    types_ = field_types(cls)
    check_keys(values, types_, section)
    kwargs = {k: coerce(v, types_[k], f"{section}.{k}" if section else k) for k, v in values.items()}
    return cls(**kwargs)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp` (bool, int, float, str, Literal, Optional, list, tuple, dict, Any)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        return _coerce_sequence(value, tp, key)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a mapping; got {value!r}")
        return dict(value)
    return _coerce_scalar(value, tp, key)


def _coerce_sequence(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if not isinstance(value, list | tuple):
        raise ValueError(f"{key} must be a list; got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ValueError(f"{key} must be a list of {len(args)} values; got {list(value)!r}")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            # NaN and inf pass every range check (`nan < 0` is False) and poison the first step
            if isinstance(number, int) and abs(number) > sys.float_info.max or not math.isfinite(number):
                raise ValueError(f"{key} must be a finite number; got {value!r}")
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"{key} must be {_name(tp)}; got {value!r}")


def _name(tp: Any) -> str:
    if isinstance(tp, type):
        return {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}.get(
            tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples/sets -> dicts/lists, so the result dumps as readable YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj) if isinstance(obj, set | frozenset) else obj
        return [to_plain(v) for v in items]
    if hasattr(obj, "value") and type(obj).__module__ != "builtins" and isinstance(obj.value, str):
        return obj.value  # enums such as TaskType
    return obj
