"""A checkpoint is trusted only when it proves itself, and a poisoned state is never one.

Each attack damages the newest checkpoint (step-64) of a copy of the baseline run, then `slimtune train
--resume` runs through the CLI. Outcomes:
  fell back  the damage is named (folder and file), the checkpoint is moved to damaged-step-64, the run
             resumes from step-63 and ends with the baseline's adapter bit for bit;
  stopped    every checkpoint is damaged: exit 2 and one `error:` line naming each damaged file.
Anything else (a resume from the damaged checkpoint, a traceback, another adapter) fails the test.

Attacks come in two kinds: on the bytes (the manifest's sizes and sha256 catch them) and on the content
with the manifest rewritten to match (`resealed`: the type and step checks of each file catch them).
The counts are printed at the end of the session (conftest) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import collections
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reliability_tools import FAULT_STATS, adapter_tensors, assert_same_tensors, write_run_config
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from slimtune.train import checkpoint as ckpt_mod
from slimtune.train.manifest import write_manifest

OUTCOMES: collections.Counter[str] = collections.Counter()


def _record(outcome: str) -> None:
    OUTCOMES[outcome] += 1
    FAULT_STATS.update({f"checkpoint_attacks_{k}": v for k, v in OUTCOMES.items()})


def _flip_4_bytes(folder: Path) -> None:
    path = folder / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    for i in (-40, -30, -20, -10):  # inside the last tensors' data: the file still parses
        data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_state(**changes: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "trainer_state.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _write_state(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "trainer_state.json").write_text(text)


def _from_step_63(name: str) -> Callable[[Path], None]:
    return lambda folder: shutil.copyfile(folder.parent / "step-63" / name, folder / name)


def _torch_save(name: str, obj: object) -> Callable[[Path], None]:
    return lambda folder: torch.save(obj, folder / name)


def _nan_weight(folder: Path) -> None:
    path = folder / "trainable.safetensors"
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(path))


def _history_after_step(folder: Path) -> None:
    path = folder / "trainer_state.json"
    state = json.loads(path.read_text())
    state["history"].append({**state["history"][-1], "step": 70})
    path.write_text(json.dumps(state))


# (attack, damage, file the message must name, rewrite the manifest to match)
ATTACKS: list[tuple[str, Callable[[Path], None], str, bool]] = [
    ("4 flipped bytes in trainable.safetensors", _flip_4_bytes, "trainable.safetensors", False),
    ("trainer_state.json of {}", _write_state("{}"), "trainer_state.json", False),
    ("step moved backwards (64 -> 60)", _edit_state(step=60), "trainer_state.json", False),
    ("optimizer.pt from step 63", _from_step_63("optimizer.pt"), "optimizer.pt", False),
    ("scheduler.pt from step 63", _from_step_63("scheduler.pt"), "scheduler.pt", False),
    ("rng.pt from step 63", _from_step_63("rng.pt"), "rng.pt", False),
    ("torch.save({}) as optimizer.pt", _torch_save("optimizer.pt", {}), "optimizer.pt", False),
    ("manifest.json cut short", lambda f: (f / "manifest.json").write_text('{"format": 2, "st'), "manifest.json",
     False),
    ("trainer_state.json of {} (resealed)", _write_state("{}"), "trainer_state.json", True),
    ("trainer_state.json of [] (resealed)", _write_state("[]"), "trainer_state.json", True),
    ("step as a string (resealed)", _edit_state(step="64"), "trainer_state.json", True),
    ("step moved backwards (resealed)", _edit_state(step=60), "trainer_state.json", True),
    ("a history row after the step (resealed)", _history_after_step, "trainer_state.json", True),
    ("optimizer.pt from step 63 (resealed)", _from_step_63("optimizer.pt"), "optimizer.pt", True),
    ("scheduler.pt from step 63 (resealed)", _from_step_63("scheduler.pt"), "scheduler.pt", True),
    ("torch.save({}) as optimizer.pt (resealed)", _torch_save("optimizer.pt", {}), "optimizer.pt", True),
    ("torch.save({}) as scheduler.pt (resealed)", _torch_save("scheduler.pt", {}), "scheduler.pt", True),
    ("torch.save([]) as rng.pt (resealed)", _torch_save("rng.pt", []), "rng.pt", True),
    ("torch.save({'scale': nan}) as scaler.pt (resealed)", _torch_save("scaler.pt", {"scale": float("nan")}),
     "scaler.pt", True),
    ("a NaN weight in trainable.safetensors (resealed)", _nan_weight, "trainable.safetensors", True),
]


def _run_copy(baseline: Path, dest: Path) -> Path:
    """The baseline run folder with only its last two checkpoints (what keep_checkpoints 2 leaves)."""
    shutil.copytree(baseline, dest, ignore=lambda d, names: [
        n for n in names if Path(d).name == "checkpoints" and n.startswith("step-") and n not in ("step-63", "step-64")])
    return dest


def _damage(folder: Path, damage: Callable[[Path], None], reseal: bool) -> None:
    damage(folder)
    if reseal:
        write_manifest(folder, int(folder.name.split("-")[1]))


def _resume(tmp_path: Path, tiny_model_dir: Path, tiny_rows: Path, run: Path) -> tuple[int, str]:
    from slimtune.cli.main import app

    config = write_run_config(tmp_path, tiny_model_dir, tiny_rows, run)
    result = CliRunner().invoke(app, ["train", str(config), "--no-progress", "--resume"])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}"
    assert "Traceback" not in result.output, result.output[-3000:]
    return result.exit_code, result.output


@pytest.mark.parametrize(("attack", "damage", "file", "reseal"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back(
        tmp_path: Path, tiny_model_dir: Path, tiny_rows: Path, baseline: Path, attack: str,
        damage: Callable[[Path], None], file: str, reseal: bool) -> None:
    run = _run_copy(baseline, tmp_path / "run")
    _damage(run / "checkpoints" / "step-64", damage, reseal)
    code, output = _resume(tmp_path, tiny_model_dir, tiny_rows, run)
    said = " ".join(output.split())
    assert code == 0, said[-2000:]
    assert f"step-64: {file} " in said and "damaged-step-64" in said, said[-2000:]
    assert "resuming from" in said and "step-63 (step 63)" in said, said[-2000:]
    assert (run / "checkpoints" / "damaged-step-64").is_dir()
    assert_same_tensors(adapter_tensors(run), adapter_tensors(baseline))
    _record("fell_back")


STOP_ATTACKS = [a for a in ATTACKS if "step 63" not in a[0]]


@pytest.mark.parametrize(("attack", "damage", "file", "reseal"), STOP_ATTACKS, ids=[a[0] for a in STOP_ATTACKS])
def test_when_every_checkpoint_is_damaged_resume_stops_naming_each_file(
        tmp_path: Path, tiny_model_dir: Path, tiny_rows: Path, baseline: Path, attack: str,
        damage: Callable[[Path], None], file: str, reseal: bool) -> None:
    run = _run_copy(baseline, tmp_path / "run")
    for step in (64, 63):
        _damage(run / "checkpoints" / f"step-{step}", damage, reseal)
    code, output = _resume(tmp_path, tiny_model_dir, tiny_rows, run)
    said = output.strip().splitlines()[-1]
    assert code == 2 and said.startswith("error:") and output.count("error:") == 1, output[-2000:]
    assert f"step-64: {file} " in said and f"step-63: {file} " in said, said
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-63", "step-64"]  # nothing moved
    _record("stopped")


# ---- values that poison a run --------------------------------------------------------------------------------
def _poisoned_trainer(tmp_path: Path, save_every: int, poison_after: int) -> object:
    """A Trainer whose weights turn NaN in the optimizer step `poison_after` (a NaN weight decay there)."""
    from test_loop import make_trainer
    from tiny_run import random_rows

    trainer = make_trainer(tmp_path, random_rows(8), max_steps=6, save_every=save_every, keep_checkpoints=6)
    real_step = trainer.optimizer_step

    def step() -> float:
        if trainer.state.step + 1 == poison_after:
            for group in trainer.ckpt.optimizer.param_groups:
                group["weight_decay"] = float("nan")
        return real_step()

    trainer.optimizer_step = step
    return trainer


@pytest.mark.parametrize(("save_every", "poison_after", "last_good"), [(1, 1, None), (1, 3, "step-2"),
                                                                       (2, 3, "step-2"), (2, 1, None)])
def test_a_poisoned_state_is_never_saved_nor_called_good(tmp_path: Path, save_every: int, poison_after: int,
                                                         last_good: str | None) -> None:
    from slimtune.train.loop import TrainingDiverged

    trainer = _poisoned_trainer(tmp_path, save_every, poison_after)
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit()
    message = str(err.value)
    saved = ckpt_mod.list_checkpoints(tmp_path / "checkpoints")
    for folder in saved:
        tensors = load_file(str(folder / "trainable.safetensors"))
        assert all(torch.isfinite(t).all() for t in tensors.values()), f"{folder.name} holds NaN"
        assert int(folder.name.split("-")[1]) < poison_after
    if last_good is None:
        assert "last good checkpoint" not in message, message
    else:
        assert f"the last good checkpoint is {tmp_path / 'checkpoints' / last_good}." in message, message
    _record("poison_refused")


def test_a_nan_checkpoint_on_disk_is_never_named_good_nor_resumed(tmp_path: Path, baseline: Path) -> None:
    """A NaN checkpoint that got there anyway (another tool, a copy): skipped by the divergence message and resume."""
    root = _run_copy(baseline, tmp_path / "run") / "checkpoints"
    _damage(root / "step-64", _nan_weight, reseal=True)
    assert ckpt_mod.last_good_checkpoint(root) == root / "step-63"
    with pytest.raises(ValueError, match=r"step-64: trainable.safetensors holds NaN or inf"):
        ckpt_mod.verify_checkpoint(root / "step-64")
    _record("poison_refused")
