"""Atomic checkpoints under output_dir/checkpoints/step-N, and resuming from the newest complete one.

# Note: atomic checkpoints
Everything is written into a hidden `.tmp-step-N` folder, each file fsync'ed, then `manifest.json` is
written *last*, and the folder is renamed to `step-N` (a rename is atomic on POSIX). A folder without a
manifest is incomplete (a crash mid-write) and is never resumed from. Older checkpoints are pruned only
after the new one is in place, so a crash at any moment leaves the last good checkpoint intact.

Layout of one checkpoint:
  trainable.safetensors   every trainable parameter, exact (what resume loads)
  method_state.safetensors  a PEFT method's state outside its parameters, if any (AdaLoRA's rank allocator)
  adapter/                the adapter in PEFT format (save_pretrained), for PEFT methods
  optimizer.pt scheduler.pt scaler.pt rng.pt   state dicts (tensors and primitives only)
  trainer_state.json      step, data position, shuffling seed, early stopping, metrics so far
  manifest.json           step, file list; written last
Every tensor is complete, also from a sharded (FSDP2) run, which gathers them first and lays them out as
its shards again on load (`Checkpointable.shard`): one checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.train.methods import load_method_state, method_state, trainable_parameters
from slimtune.train.rng import rng_state, set_rng_state
from slimtune.train.state import TrainState

MANIFEST = "manifest.json"
METHOD_STATE = "method_state.safetensors"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


@dataclass
class Checkpointable:
    """The live objects a checkpoint captures and restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    save_adapter: bool
    """Also write the adapter with save_pretrained (PEFT methods)."""
    shard: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """shard(complete saved tensor, live parameter) -> the tensor laid out like the parameter (FSDP2: this
    rank's shard, see train/distributed.py); None: parameters are complete tensors."""


def save_checkpoint(root: Path, objs: Checkpointable, state: TrainState, keep: int,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `root/step-{state.step}` atomically, then keep only the newest `keep`.

    `optimizer_state` replaces `objs.optimizer.state_dict()` (FSDP2: the one with complete tensors).

    A failed write (full disk, ...) removes the partial folder; the disk being full is reported as
    OSError(ENOSPC) naming the last good checkpoint, whatever layer (torch, safetensors) noticed it.
    """
    final = root / f"step-{state.step}"
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{state.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(tmp, objs, state, optimizer_state)
    except (OSError, RuntimeError, SafetensorError) as err:
        failure = write_failure(err, tmp, f"checkpoint {final}", latest_checkpoint(root))
        shutil.rmtree(tmp, ignore_errors=True)
        raise failure from err
    shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of a crashed run
    os.replace(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


def write_failure(err: BaseException, folder: Path, what: str, last_good: Path | None) -> BaseException:
    """`err` as an OSError(ENOSPC) with a readable message if the disk is full, else `err` unchanged."""
    full = isinstance(err, OSError) and err.errno == errno.ENOSPC
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(folder if folder.exists() else folder.parent).free < _FULL_DISK_BYTES
    if not full:
        return err
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: could not write {what}; {kept}. "
                                 "Free some space, then continue with --resume")


def _write_checkpoint(tmp: Path, objs: Checkpointable, state: TrainState,
                      optimizer_state: dict[str, Any] | None) -> None:
    tmp.mkdir()
    tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in trainable_parameters(objs.model).items()}
    save_file(tensors, str(tmp / "trainable.safetensors"))
    if extra := method_state(objs.model):
        save_file(extra, str(tmp / METHOD_STATE))
    if objs.save_adapter:
        objs.model.save_pretrained(str(tmp / "adapter"))
    torch.save(objs.optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
    torch.save(objs.scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(objs.scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state.to_dict(), indent=1))
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    _fsync_tree(tmp)
    _write_synced(tmp / MANIFEST, json.dumps({"format": FORMAT_VERSION, "step": state.step, "files": files}))


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and leftovers of interrupted writes.

    A checkpoint is renamed out of the `step-N` namespace before its files go, so a kill during the
    delete never leaves a `step-N` that has a manifest but misses files.
    """
    for old in list_checkpoints(root)[:-keep]:
        doomed = root / f".deleting-{old.name}"
        os.replace(old, doomed)
        shutil.rmtree(doomed)
    for p in root.iterdir():
        leftover = p.name.startswith((".tmp-step-", ".deleting-step-"))
        if p.is_dir() and (leftover or (_STEP_DIR.match(p.name) and not is_complete(p))):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, objs: Checkpointable) -> TrainState:
    """Restore weights, optimizer, scheduler, scaler and RNG from `path`; return its TrainState."""
    if not is_complete(path):
        raise ValueError(f"checkpoint {path} is incomplete (no {MANIFEST})")
    device = next(objs.model.parameters()).device
    _read(path / "trainable.safetensors", lambda f: _load_trainable(f, objs.model, objs.shard))
    extra = path / METHOD_STATE
    load_method_state(objs.model, _read(extra, lambda f: load_file(str(f))) if extra.is_file() else {})
    optimizer_state = _read(path / "optimizer.pt", lambda f: _load(f, device))
    objs.optimizer.load_state_dict(_shard_optimizer_state(optimizer_state, objs.optimizer, objs.shard))
    objs.scheduler.load_state_dict(_read(path / "scheduler.pt", lambda f: _load(f, "cpu")))
    objs.scaler.load_state_dict(_read(path / "scaler.pt", lambda f: _load(f, "cpu")))
    set_rng_state(_read(path / "rng.pt", lambda f: _load(f, "cpu")))
    state = _read(path / "trainer_state.json", lambda f: json.loads(f.read_text()))
    return TrainState.from_dict(state)


def _read(file: Path, load: Callable[[Path], Any]) -> Any:
    """load(file), with a damaged or missing file reported as a ValueError naming it."""
    try:
        return load(file)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError, json.JSONDecodeError,
            KeyError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"checkpoint {file.parent}: {file.name} is damaged or unreadable ({reason}); delete "
                         f"{file.parent} to resume from the checkpoint before it") from None


def _load(path: Path, device: Any) -> Any:
    return torch.load(path, map_location=device, weights_only=True)


def _load_trainable(path: Path, model: nn.Module, shard: Callable[..., torch.Tensor] | None) -> None:
    saved = load_file(str(path))
    params = trainable_parameters(model)
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"checkpoint {path.parent} does not match this model/method (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); resume with the config it was trained with"
        )
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise ValueError(f"checkpoint {path.parent}: {name} has shape {tuple(saved[name].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(saved[name] if shard is None else shard(saved[name], p))


def _shard_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer,
                           shard: Callable[..., torch.Tensor] | None) -> dict[str, Any]:
    """`saved` with each parameter-shaped state tensor (Adam moments) laid out like its parameter."""
    if shard is None:
        return saved
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state_dict's numbering
    for i, entry in saved.get("state", {}).items():
        for key, value in entry.items():
            if isinstance(i, int) and i < len(params) and torch.is_tensor(value) and value.shape == params[i].shape:
                entry[key] = shard(value, params[i])
    return saved


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
