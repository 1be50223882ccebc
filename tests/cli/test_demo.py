"""`slimtune demo` logic on a tiny model (the real one, SmolLM2-135M, takes minutes: run it by hand)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from slimtune.cli.demo import clear_previous_demo, held_out_prompts, run_demo
from slimtune.cli.main import app
from slimtune.train.run_folder import RUN_MARKER


def test_demo_trains_and_shows_before_after(tmp_path: Path, tiny_model_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    log = io.StringIO()
    run_demo(steps=3, output_dir=tmp_path / "demo", console=Console(file=log, width=200),
             model_path=tiny_model_dir, progress=False, n_held_out=16)
    table = capsys.readouterr().out
    for word in ("indicator", "denial", "fierce", "trial"):
        assert word in table
    match = re.search(r"held-out loss \(16 rows\): before (\d+\.\d+) -> after (\d+\.\d+)", log.getvalue())
    assert match, log.getvalue()
    before, after = map(float, match.groups())
    assert after < before
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    # a second demo into the same folder replaces the first run: only the new run's marker is left
    clear_previous_demo(tmp_path / "demo", Console(file=log))
    assert "replacing the earlier demo run" in log.getvalue()
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [RUN_MARKER]


def test_demo_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--output-dir", str(tmp_path), "--steps", "1"])
    assert result.exit_code == 2
    assert "is not empty and holds no earlier demo run" in " ".join(result.output.split())
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_held_out_prompts_are_user_turns_from_the_shipped_eval_file() -> None:
    prompts = held_out_prompts(4)
    assert [p["messages"][-1]["role"] for p in prompts] == ["user"] * 4
    assert prompts[0]["messages"][-1]["content"] == 'What does the word "indicator" mean?'
    assert prompts[0]["reference"].startswith('As a noun, "indicator" means')
