"""Checkpoint failure modes: a kill while pruning, a damaged file on resume, a full disk while saving."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_loop import make_trainer
from tiny_run import random_rows

from slimtune.train import checkpoint as ckpt


class Killed(BaseException):
    """Stands for SIGKILL."""


def trained(tmp_path: Path, steps: int = 4) -> Path:
    make_trainer(tmp_path, random_rows(8), max_steps=steps, save_every=1, keep_checkpoints=steps).fit()
    return tmp_path / "checkpoints"


def test_a_kill_while_pruning_never_leaves_a_complete_looking_broken_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = trained(tmp_path)
    real_rmtree = shutil.rmtree

    def killed_midway(path: str | os.PathLike, *args: object, **kwargs: object) -> None:
        (Path(path) / "scheduler.pt").unlink()
        raise Killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        ckpt.prune(root, keep=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    survivors = ckpt.list_checkpoints(root)
    assert [p.name for p in survivors] == ["step-2", "step-3", "step-4"]
    assert all((p / "scheduler.pt").is_file() for p in survivors)
    ckpt.prune(root, keep=2)  # the next prune finishes the job
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-4"]


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt", "trainable.safetensors", "trainer_state.json"])
def test_a_damaged_file_is_a_value_error_naming_it(tmp_path: Path, name: str) -> None:
    root = trained(tmp_path, steps=2)
    damaged = root / "step-2" / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    trainer = make_trainer(tmp_path, random_rows(8), max_steps=4)
    with pytest.raises(ValueError, match=rf"step-2: {name} is damaged or unreadable .*delete .*step-2 to resume"):
        trainer.fit(resume=True)


def test_full_disk_while_saving_names_the_last_good_checkpoint(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tmp_path, random_rows(8), max_steps=4, save_every=2)
    real_save = torch.save

    def enospc_on_step_4(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if "step-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 254")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", enospc_on_step_4)
    monkeypatch.setattr(ckpt, "_FULL_DISK_BYTES", 1 << 62)  # "no space left" as seen by disk_usage
    with pytest.raises(OSError) as err:
        trainer.fit()
    assert err.value.errno == errno.ENOSPC
    assert "No space left on device: could not write checkpoint" in str(err.value)
    assert "the last good checkpoint is" in str(err.value) and "step-2" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]


def test_other_write_errors_pass_through_and_leave_no_partial_folder(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tmp_path, random_rows(8), max_steps=2, save_every=2)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        trainer.fit()
    assert not (tmp_path / "checkpoints").exists() or list((tmp_path / "checkpoints").iterdir()) == []
