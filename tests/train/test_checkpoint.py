"""Checkpoint failure modes: a kill while pruning, a damaged file on resume, a full disk while saving."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
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
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path, name: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = trained(tmp_path, steps=2)
    want = {k: v.clone() for k, v in load_file(str(root / "step-2" / "trainable.safetensors")).items()}
    damaged = root / "step-2" / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    make_trainer(tmp_path, random_rows(8), max_steps=2, keep_checkpoints=2).fit(resume=True)
    said = " ".join(capsys.readouterr().err.split())
    assert f"step-2: {name} has" in said and "resuming from" in said and "step-1 (step 1)" in said
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-1", "step-2"]
    assert (root / "damaged-step-2" / name).is_file()  # kept for inspection, out of the step-N namespace
    got = load_file(str(root / "step-2" / "trainable.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)  # step 2 trained again from step 1, exactly


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt", "trainable.safetensors", "trainer_state.json"])
def test_no_intact_checkpoint_is_a_value_error_naming_each_damaged_file(tmp_path: Path, name: str) -> None:
    root = trained(tmp_path, steps=2)
    for step in (1, 2):
        damaged = root / f"step-{step}" / name
        damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    trainer = make_trainer(tmp_path, random_rows(8), max_steps=4)
    with pytest.raises(ValueError, match=rf"no intact checkpoint .*step-2: {name} has .*step-1: {name} has"):
        trainer.fit(resume=True)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-1", "step-2"]  # nothing moved


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


def rows_without_timing(tmp: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "memory_gb")} for r in rows]


def test_the_first_row_after_a_resume_averages_the_same_steps(tmp_path: Path) -> None:
    """save_every 2, log_every 3: the checkpoint of step 4 carries step 4, which the row of step 6 averages."""
    rows, cadence = random_rows(8), {"max_steps": 6, "save_every": 2, "log_every": 3}
    make_trainer(tmp_path / "full", rows, **cadence).fit()
    crashed = make_trainer(tmp_path / "run", rows, **cadence)
    calls = {"n": 0}

    def crash_in_step_5(module: torch.nn.Module, args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    crashed.model.register_forward_pre_hook(crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    window = json.loads((tmp_path / "run" / "checkpoints" / "step-4" / "trainer_state.json").read_text())["window"]
    assert window["steps"] == 1
    make_trainer(tmp_path / "run", rows, **cadence).fit(resume=True)
    assert rows_without_timing(tmp_path / "run") == rows_without_timing(tmp_path / "full")
    assert [r["step"] for r in rows_without_timing(tmp_path / "run")] == [3, 6]


def test_a_longer_max_steps_on_resume_is_the_longer_schedule_from_the_first_resumed_step(tmp_path: Path) -> None:
    """Note: the schedule of a resumed run (train/optim.py)."""
    rows, schedule = random_rows(8), {"scheduler": "linear", "warmup_steps": 1, "lr": 1e-3}
    make_trainer(tmp_path / "long", rows, max_steps=8, **schedule).fit()
    make_trainer(tmp_path / "run", rows, max_steps=4, **schedule).fit()  # finished: its next lr would be 0
    make_trainer(tmp_path / "run", rows, max_steps=8, **schedule).fit(resume=True)
    got, want = rows_without_timing(tmp_path / "run"), rows_without_timing(tmp_path / "long")
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["lr"] for r in got[4:]] == [r["lr"] for r in want[4:]]
    assert [r["lr"] for r in got[4:]] == pytest.approx([1e-3 * (1 - s / 7) for s in (3, 4, 5, 6)])
