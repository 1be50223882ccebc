"""A full disk during a checkpoint save: the previous checkpoint stays intact and loadable, the failed one is
never resumed from, the error says what happened, and once space is back `--resume` continues bit-exactly.

Two ways to fill the disk:
  - a real size-limited tmpfs (mounted here when the tests run as root; skipped otherwise), with the
    real CLI in a subprocess: the third checkpoint does not fit;
  - everywhere: ENOSPC raised from inside `save_checkpoint` at each of its writes in turn (the
    checkpoint API called in-process, the write functions replaced for the test).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from reliability_tools import assert_same_tensors, check_checkpoint_loadable, run_train, write_run_config
from safetensors.torch import load_file

from slimtune.train import checkpoint as ckpt_mod

PAGE = 4096


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---- in-process: ENOSPC at each write of save_checkpoint ----------------------------------------------------
def _checkpointable() -> ckpt_mod.Checkpointable:
    from tiny_run import build_llama

    from slimtune import LoraConfig, get_peft_model
    from slimtune.train.config import TrainConfig
    from slimtune.train.optim import build_optimizer, build_scheduler

    model = get_peft_model(build_llama(None), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(lr=1e-2)
    optimizer = build_optimizer(params, cfg)
    objs = ckpt_mod.Checkpointable(model, optimizer, build_scheduler(optimizer, cfg, 10),
                                   torch.amp.GradScaler("cpu", enabled=False), save_adapter=True)
    _train_step(objs)
    return objs


def _train_step(objs: ckpt_mod.Checkpointable) -> None:
    """One optimizer and scheduler step, so that a TrainState of the next step agrees with them."""
    ids = torch.arange(3, 13).unsqueeze(0)
    objs.model(input_ids=ids, labels=ids).loss.backward()
    objs.optimizer.step()
    objs.scheduler.step()
    objs.optimizer.zero_grad()


WRITES = ["trainable.safetensors", "adapter", "optimizer.pt", "rng.pt", "trainer_state.json", "manifest.json"]


@pytest.mark.parametrize("failing_write", WRITES)
def test_enospc_inside_a_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            failing_write: str) -> None:
    from slimtune.train.state import TrainState

    objs = _checkpointable()
    root = tmp_path / "checkpoints"
    first = ckpt_mod.save_checkpoint(root, objs, TrainState(step=1), keep=2)
    before = {k: v.clone() for k, v in load_file(str(first / "trainable.safetensors")).items()}
    _train_step(objs)
    patches = {
        "trainable.safetensors": (ckpt_mod, "save_file"),
        "adapter": (objs.model, "save_pretrained"),
        "optimizer.pt": (torch, "save"),
        "rng.pt": (ckpt_mod, "rng_state"),
        "trainer_state.json": (Path, "write_text"),
        "manifest.json": (ckpt_mod, "write_manifest"),
    }
    target, name = patches[failing_write]
    monkeypatch.setattr(target, name, _enospc)
    with pytest.raises(OSError) as err:
        ckpt_mod.save_checkpoint(root, objs, TrainState(step=2), keep=2)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and "No space left on device" in str(err.value)
    assert ckpt_mod.latest_checkpoint(root) == first and ckpt_mod.list_checkpoints(root) == [first]
    assert check_checkpoint_loadable(first) == 1
    assert_same_tensors(load_file(str(first / "trainable.safetensors")), before)
    assert not (root / "step-2").exists()
    # The next save (space is back) succeeds and clears the half-written folder.
    ckpt_mod.save_checkpoint(root, objs, TrainState(step=2), keep=2)
    assert [p.name for p in ckpt_mod.list_checkpoints(root)] == ["step-1", "step-2"]
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]
    assert ckpt_mod.load_checkpoint(root / "step-2", objs).step == 2


# ---- the real CLI on a real full disk (tmpfs) ----------------------------------------------------------------
def _pages(folder: Path) -> int:
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_rows: Path,
                  baseline: Path) -> dict[str, object]:
    """Train 6 steps on a tmpfs with room for two checkpoints only; then free space and --resume."""
    root = tmp_path_factory.mktemp("diskfull")
    mount = root / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ckpt = _pages(baseline / "checkpoints" / "step-2")
        free = shutil.disk_usage(mount).free
        room = 2 * ckpt + 64 * 1024  # two checkpoints, config.yaml, metrics.jsonl, and part of a third
        (mount / "filler").write_bytes(b"\0" * (free - room))
        config = write_run_config(root, tiny_model_dir, tiny_rows, mount / "run", max_steps=6)
        failed = run_train(config)
        after_failure = sorted(p.name for p in (mount / "run" / "checkpoints").iterdir())
        complete = [mount / "run" / "checkpoints" / n for n in after_failure
                    if (mount / "run" / "checkpoints" / n / "manifest.json").is_file()]
        loaded = {p.name: check_checkpoint_loadable(p) for p in complete}
        kept = {p.name: load_file(str(p / "trainable.safetensors")) for p in complete}
        (mount / "filler").unlink()
        resumed = run_train(config, "--resume")
        final = load_file(str(mount / "run" / "checkpoints" / "step-6" / "trainable.safetensors"))
        return {"failed": failed, "after_failure": after_failure, "loaded": loaded, "resumed": resumed,
                "final": final, "kept": kept}
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_keeps_the_last_checkpoint_and_resume_finishes(full_disk_run: dict, baseline: Path) -> None:
    failed, resumed = full_disk_run["failed"], full_disk_run["resumed"]
    assert failed.returncode != 0  # what it prints: see the xfail test below
    assert full_disk_run["loaded"], full_disk_run["after_failure"]  # at least one complete checkpoint survived
    for name, step in full_disk_run["loaded"].items():
        want = load_file(str(baseline / "checkpoints" / name / "trainable.safetensors"))
        assert_same_tensors(full_disk_run["kept"][name], want)
        assert step < 6
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    assert_same_tensors(full_disk_run["final"], load_file(str(baseline / "checkpoints" / "step-6" /
                                                              "trainable.safetensors")))


def test_full_disk_is_one_error_line_without_traceback(full_disk_run: dict) -> None:
    """Found by this suite (a traceback of torch's 'unexpected pos' RuntimeError); fixed in train/checkpoint.py
    (write_failure) and cli/main.py: one line naming the last good checkpoint."""
    failed = full_disk_run["failed"]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "No space left on device" in last, last
    assert "last good checkpoint is" in last and "step-" in last and "--resume" in last
