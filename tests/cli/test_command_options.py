"""Command options come from config dataclasses, and only user errors become one line: a bug keeps its traceback.

Every init field of a command's config dataclasses is an option whose default and help are the field's;
values reach the dataclass, and its checks refuse bad ones with one `error:` line (exit 2). An internal
TypeError or ImportError is not a user error: it propagates (CliRunner hands it back as result.exception).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from slimtune.cli.main import app
from slimtune.cli.options import config_command
from slimtune.errors import MissingDependency
from slimtune.eval.config import EvalConfig
from slimtune.infer.config import ChatConfig, ExportConfig, MergeConfig, ServeModels
from slimtune.infer.serve.config import ServeConfig
from slimtune.train.docs import field_docs

COMMANDS = {"eval": (EvalConfig,), "chat": (ChatConfig,), "merge": (MergeConfig,), "export": (ExportConfig,),
            "serve": (ServeModels, ServeConfig)}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_config_field_is_an_option_with_its_default_and_help(name: str) -> None:
    command = typer.main.get_command(app).commands[name]
    params = {p.name: p for p in command.params}
    for cls in COMMANDS[name]:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            param = params[f.name]
            assert param.help == docs[f.name] and param.help, f.name
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                assert param.required, f.name
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                assert param.default == default and not param.required, f.name
    expected = {f.name for cls in COMMANDS[name] for f in dataclasses.fields(cls)} | {"help"}
    assert set(params) | {"help"} == expected


def test_options_reach_the_dataclass() -> None:
    @dataclass(kw_only=True)
    class Tiny:
        name: str
        """Who."""
        count: int = 3
        """How many."""
        loud: bool = False
        """Shout."""
        tags: list[str] | None = None
        """Labels."""

        def __post_init__(self) -> None:
            if self.count < 1:
                raise ValueError(f"--count {self.count} must be at least 1")

    seen: list[Tiny] = []
    tiny = typer.Typer()
    tiny.callback()(lambda: None)
    tiny.command("go")(config_command(seen.append, Tiny, doc="Go."))
    ok = CliRunner().invoke(tiny, ["go", "--name", "a", "--count", "5", "--loud", "--tags", "x", "--tags", "y"])
    assert ok.exit_code == 0, ok.output
    assert seen == [Tiny(name="a", count=5, loud=True, tags=["x", "y"])]
    assert CliRunner().invoke(tiny, ["go", "--name", "b"]).exit_code == 0 and seen[-1] == Tiny(name="b")
    bad = CliRunner().invoke(tiny, ["go", "--name", "c", "--count", "0"])
    assert bad.exit_code == 2 and "error: --count 0 must be at least 1" in " ".join(bad.output.split())
    assert len(seen) == 2


@pytest.mark.parametrize("args, message", [
    (["eval", "--model", "m", "--data", "d", "--output", "o", "--judge-max-new-tokens", "0"],
     "--judge-max-new-tokens 0 must be a positive integer"),
    (["serve", "--model", "m", "--max-connections", "0"], "serve max_connections=0 must be at least 1"),
    (["serve", "--model", "m", "--read-timeout-s", "inf"], "serve read_timeout_s=inf must be a positive number"),
    (["serve", "--model", "m", "--max-prompt-tokens", "0"], "serve max_prompt_tokens=0 must be at least 1"),
    (["chat", "--model", "m", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
    (["merge", "--model", "m", "--adapter", "a", "--output", "o", "--max-logit-diff", "-1"],
     "--max-logit-diff -1.0 must be a number >= 0"),
    (["export", "--gguf", "--model", "m", "--output", "o", "--outtype", "f16", "--outtype", "f16"],
     "--outtype repeats a value"),
])
def test_options_formerly_unsettable_are_checked_by_their_dataclass(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and text.count("error:") == 1 and message in text, result.output
    assert "Traceback" not in result.output


def _load_fails_with(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    import slimtune.infer.loading

    def load_for_inference(*args: object, **kwargs: object) -> None:
        raise err

    monkeypatch.setattr(slimtune.infer.loading, "load_for_inference", load_for_inference)


@pytest.mark.parametrize("bug", [TypeError("unsupported operand type(s) for +: 'int' and 'str'"),
                                 ModuleNotFoundError("No module named 'slimtune.gone'"),
                                 KeyError("q_proj"), AttributeError("'NoneType' object has no attribute 'x'")])
def test_an_internal_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, bug: BaseException) -> None:
    _load_fails_with(monkeypatch, bug)
    result = CliRunner().invoke(app, ["chat", "--model", "base"], input="hi\n")
    assert result.exception is bug and "error:" not in result.output, result.output
    with pytest.raises(type(bug)):
        CliRunner().invoke(app, ["chat", "--model", "base"], input="hi\n", catch_exceptions=False)


def test_a_missing_optional_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _load_fails_with(monkeypatch, MissingDependency("GGUF export needs the 'gguf' package: pip install gguf"))
    result = CliRunner().invoke(app, ["chat", "--model", "base"], input="hi\n")
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "error: GGUF export needs the 'gguf' package: pip install gguf" in text
    assert isinstance(MissingDependency("x"), ImportError)  # callers catching ImportError still do


def test_a_bug_prints_a_traceback_from_the_real_entry_point(tmp_path: Path) -> None:
    """The installed entry point, in its own process: the bug's traceback reaches stderr, exit code 1."""
    script = tmp_path / "bug.py"
    script.write_text(
        "import sys\n"
        "import slimtune.infer.loading as loading\n"
        "def broken(*a, **k):\n"
        "    raise TypeError('a bug in slimtune')\n"
        "loading.load_for_inference = broken\n"
        "from slimtune.cli.main import main\n"
        "sys.argv = ['slimtune', 'chat', '--model', 'base']\n"
        "main()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" in done.stderr, done.stderr
    assert "TypeError: a bug in slimtune" in done.stderr and "error:" not in done.stderr
