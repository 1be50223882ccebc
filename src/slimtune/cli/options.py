"""Command options generated from config dataclasses: one `--field-name` per field, its docstring as help.

A command's settings live in its config dataclasses (defaults, docs, `__post_init__` checks); the CLI
only names them. `config_command(body, EvalConfig)` returns a function typer can register: its
signature has one option per init field (required fields are required options, booleans get
`--x/--no-x`), and calling it builds each dataclass from the options and passes the instances to `body` (in
`common.guarded`).
Range checks are the dataclass's, so a bad value fails the same way from Python and from the shell.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer

from slimtune.cli.common import guarded
from slimtune.train.docs import field_docs

__all__ = ["config_command", "option_params"]


def option_params(cls: type, option_args: Mapping[str, Mapping[str, Any]] | None = None) -> list[inspect.Parameter]:
    """One keyword parameter per init field of dataclass `cls`, annotated with its typer.Option.

    option_args: extra typer.Option arguments by field name (e.g. {"api_key": {"envvar": "KEY"}}).
    """
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        decl = f"{flag}/--no-{flag[2:]}" if tp is bool else flag
        default = _default(f)
        kwargs: dict[str, Any] = {"help": docs.get(f.name, ""), **(option_args or {}).get(f.name, {})}
        if default is inspect.Parameter.empty:
            kwargs.setdefault("show_default", False)
        option = typer.Option(decl, **kwargs)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[tp, option]))
    return params


def config_command(body: Callable[..., None], *classes: type, doc: str,
                   option_args: Mapping[str, Mapping[str, Any]] | None = None) -> Callable[..., None]:
    """A typer command whose options are the fields of `classes`; it calls `body(*instances)`, guarded.

    A field name shared by two classes is one option whose value goes to both (e.g. `model`). Building
    the instances runs inside `guarded`, so a value their checks refuse is one error line.
    """
    params: dict[str, inspect.Parameter] = {}
    for cls in classes:
        for param in option_params(cls, option_args):
            params.setdefault(param.name, param)

    def command(**values: Any) -> None:
        def build(cls: type) -> Any:
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            return cls(**{k: v for k, v in values.items() if k in names})

        guarded(lambda: body(*[build(cls) for cls in classes]))

    ordered = sorted(params.values(), key=lambda p: p.default is not inspect.Parameter.empty)  # required first
    command.__signature__ = inspect.Signature(ordered)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in ordered}
    command.__doc__ = doc
    command.__name__ = body.__name__
    return command


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return inspect.Parameter.empty
