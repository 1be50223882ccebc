"""Nothing we did not write is destroyed: `slimtune train` and `slimtune demo` refuse a folder that holds
files and no run marker, and leave every byte of it as it was (Note: run folder ownership, train/run_folder.py).

Each attack is a folder a user could point output_dir at by mistake; the snapshot of every file (path,
bytes) before and after must be equal, and the command must end with one `error:` line and exit 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from reliability_tools import FAULT_STATS, run_train, write_run_config
from typer.testing import CliRunner

from slimtune.cli.main import app
from slimtune.train.run_folder import RUN_MARKER


def _project(folder: Path) -> Path:
    """A user's project folder with names a run also writes (config.yaml, README.md, checkpoints/, ...)."""
    files = {
        "config.yaml": "experiment: mine\n", "README.md": "# my thesis project\n", "metrics.jsonl": "{}\n",
        "loss.png": "not a plot", "thesis.tex": "\\section{Results}", "src/model.py": "print('mine')\n",
        "adapter/adapter_model.safetensors": "my own weights", "checkpoints/step-3/notes.txt": "keep me",
        "checkpoints/.tmp-step-9/draft.txt": "keep me too", "checkpoints/step-x/data.bin": "mine",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(output: str) -> str:
    text = " ".join(output.split())
    assert text.startswith("error:") and "Traceback" not in output, output
    return text


ATTACKS = ["project", "only-config-yaml", "only-checkpoints", "bad-marker", "marker-is-a-folder"]


def _foreign(folder: Path, attack: str) -> Path:
    folder.mkdir(parents=True)
    if attack == "project":
        _project(folder)
    elif attack == "only-config-yaml":
        (folder / "config.yaml").write_text("model: x\n")
    elif attack == "only-checkpoints":
        (folder / "checkpoints" / "step-1").mkdir(parents=True)
        (folder / "checkpoints" / "step-1" / "weights.bin").write_text("mine")
    elif attack == "bad-marker":  # a file of that name that slimtune did not write
        _project(folder)
        (folder / RUN_MARKER).write_text("[]")
    else:
        (folder / RUN_MARKER).mkdir()
        (folder / RUN_MARKER / "x").write_text("mine")
    return folder


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("resume", [False, True])
def test_train_refuses_a_folder_it_did_not_create(tmp_path: Path, tiny_model_dir: Path, tiny_rows: Path,
                                                  attack: str, resume: bool) -> None:
    out = _foreign(tmp_path / "project", attack)
    before = _snapshot(out)
    config = write_run_config(tmp_path, tiny_model_dir, tiny_rows, out, max_steps=1)
    result = CliRunner().invoke(app, ["train", str(config), "--no-progress", *(["--resume"] if resume else [])])
    assert result.exit_code == 2, result.output
    assert "is not a slimtune run folder" in _one_error_line(result.output)
    assert _snapshot(out) == before
    FAULT_STATS["foreign_folders_refused"] = int(FAULT_STATS.get("foreign_folders_refused", 0)) + 1


@pytest.mark.parametrize("attack", [*ATTACKS, "train-run"])
def test_demo_refuses_a_folder_that_is_not_an_earlier_demo(tmp_path: Path, attack: str) -> None:
    out = tmp_path / "project"
    if attack == "train-run":  # ours, but a training run: the demo must not replace it
        _project(out.parent / "seed")
        shutil.copytree(out.parent / "seed", out)
        (out / RUN_MARKER).write_text('{"command": "train"}')
    else:
        _foreign(out, attack)
    before = _snapshot(out)
    result = CliRunner().invoke(app, ["demo", "--output-dir", str(out), "--steps", "1"])
    assert result.exit_code == 2, result.output
    _one_error_line(result.output)
    assert _snapshot(out) == before
    FAULT_STATS["foreign_folders_refused"] = int(FAULT_STATS.get("foreign_folders_refused", 0)) + 1


def test_a_run_folder_is_marked_and_reused_and_a_new_empty_folder_is_claimed(tmp_path: Path, tiny_model_dir: Path,
                                                                            tiny_rows: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    config = write_run_config(tmp_path, tiny_model_dir, tiny_rows, empty, max_steps=2, save_every=1)
    done = run_train(config)
    assert done.returncode == 0, done.stderr
    assert '"command": "train"' in (empty / RUN_MARKER).read_text()
    again = run_train(config, "--resume")  # our own folder: resumed (nothing left to train), not refused
    assert again.returncode == 0, again.stderr
    assert (empty / "adapter" / "adapter_model.safetensors").is_file()
