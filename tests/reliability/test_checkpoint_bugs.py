"""Checkpoint failure modes found by the fault suite, kept as regression tests.

Both were first pinned here as strict xfails (src/slimtune/train/ is not ours to edit) and then fixed by its
owner in 15c0622: prune() renames a checkpoint out of the step-N namespace before deleting it, and
load_checkpoint() turns a damaged file into a ValueError naming it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from reliability_tools import check_checkpoint_loadable, write_run_config
from typer.testing import CliRunner

from slimtune.train import checkpoint as ckpt_mod


def _copy_run(baseline: Path, dest: Path, keep: list[str]) -> Path:
    """A copy of the baseline run folder holding only the checkpoints named in `keep`."""
    shutil.copytree(baseline, dest, ignore=lambda d, names: [n for n in names if Path(d).name == "checkpoints"
                                                             and n.startswith("step-") and n not in keep])
    return dest


class _Killed(BaseException):
    """Stands for SIGKILL arriving in the middle of shutil.rmtree."""


def test_a_kill_inside_prune_never_leaves_a_complete_looking_broken_checkpoint(
        tmp_path: Path, baseline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _copy_run(baseline, tmp_path / "run", ["step-3", "step-4", "step-5"]) / "checkpoints"
    real_rmtree = shutil.rmtree

    def rmtree_killed_midway(path: str | os.PathLike, *args: object, **kwargs: object) -> None:
        folder = Path(path)
        if "step-" in folder.name and (folder / "scheduler.pt").exists():
            (folder / "scheduler.pt").unlink()  # the first files go, then the process dies
            raise _Killed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", rmtree_killed_midway)
    with pytest.raises(_Killed):
        ckpt_mod.prune(root, keep=2)
    monkeypatch.undo()
    for folder in ckpt_mod.list_checkpoints(root):  # what resume, eval or export would trust
        check_checkpoint_loadable(folder)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_resume_from_a_damaged_checkpoint_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path, tiny_rows: Path,
                                                           baseline: Path, damage: str) -> None:
    from slimtune.cli.main import app

    run = _copy_run(baseline, tmp_path / "run", ["step-63", "step-64"])
    for step in (63, 64):  # one damaged checkpoint is skipped (test_checkpoint_trust.py): damage both
        optimizer = run / "checkpoints" / f"step-{step}" / "optimizer.pt"
        data = optimizer.read_bytes()
        optimizer.write_bytes(b"PK\x03\x04 not a zip" if damage == "garbage" else data[: len(data) // 2])
    config = write_run_config(tmp_path, tiny_model_dir, tiny_rows, run)
    result = CliRunner().invoke(app, ["train", str(config), "--no-progress", "--resume"])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}"
    assert result.exit_code == 2 and "optimizer.pt" in result.output


def test_a_kill_before_the_manifest_leaves_nothing_resumable_from_that_step(tmp_path: Path, baseline: Path) -> None:
    """A folder with every file but the manifest (the rename happened by hand, or a copy was cut short)
    is not a checkpoint: resume uses the one before, and the next prune removes it."""
    root = _copy_run(baseline, tmp_path / "run", ["step-3", "step-4"]) / "checkpoints"
    (root / "step-4" / "manifest.json").unlink()
    assert ckpt_mod.latest_checkpoint(root) == root / "step-3"
    ckpt_mod.prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-3"]
    assert json.loads((root / "step-3" / "manifest.json").read_text())["step"] == 3
