"""Atomic checkpoints under output_dir/checkpoints/step-N, and resuming from the newest one that proves intact.

# Note: atomic checkpoints
Everything is written into a hidden `.tmp-step-N` folder, each file fsync'ed, then `manifest.json` is
written *last*, and the folder is renamed to `step-N` (a rename is atomic on POSIX). A folder without a
manifest is incomplete (a crash mid-write) and is never resumed from. Older checkpoints are pruned only
after the new one is in place, so a crash at any moment leaves the last good checkpoint intact.

Layout of one checkpoint:
  trainable.safetensors   every trainable parameter, exact (what resume loads)
  method_state.safetensors  a PEFT method's state outside its parameters, if any (AdaLoRA's rank allocator)
  adapter/                the adapter in PEFT format (save_pretrained), for PEFT methods, with
                          base_quantization.json (the base it was trained on)
  optimizer.pt scheduler.pt scaler.pt rng.pt   state dicts (tensors and primitives only)
  trainer_state.json      step, data position, shuffling seed, early stopping, metrics so far, the
                          partial metrics window
  manifest.json           step, size and sha256 of every other file (train/manifest.py); written last
Every tensor is complete, also from a sharded (FSDP2) run, which gathers them first and lays them out as
its shards again on load (`Checkpointable.shard`): one checkpoint resumes on any number of ranks.

# Note: trusting a checkpoint
A checkpoint is restored only after all of it has been read and checked: every file against the
manifest's size and hash, trainer_state.json field by field (train/state.py), each state dict for the
keys, sizes and step it must have, weights and moments for NaN/inf (train/checkpoint_content.py).
Nothing is restored before all checks pass, so `resume_latest` can fall back from a damaged newest
checkpoint to the one before it. A state with NaN or inf is never written in the first place.
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

from slimtune.adapter_base import BaseQuantization, write_base_quantization
from slimtune.train.checkpoint_content import (
    check_optimizer_state,
    check_rng_state,
    check_scaler_state,
    check_schedule_state,
    first_nonfinite,
)
from slimtune.train.manifest import MANIFEST, CheckpointDamaged, Manifest, verify_manifest, write_manifest
from slimtune.train.methods import load_method_state, method_state, trainable_parameters
from slimtune.train.optim import set_schedule_step
from slimtune.train.rng import rng_state, set_rng_state
from slimtune.train.state import TrainState

METHOD_STATE = "method_state.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


class NonFiniteState(ValueError):
    """The weights or optimizer moments hold NaN or inf: such a state is never written as a checkpoint."""


@dataclass
class Checkpointable:
    """The live objects a checkpoint captures and restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    save_adapter: bool
    """Also write the adapter with save_pretrained (PEFT methods)."""
    base_record: BaseQuantization | None = None
    """Written beside that adapter (slimtune.adapter_base), so a checkpoint's adapter loads on its base."""
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
    tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in trainable_parameters(objs.model).items()}
    optimizer = objs.optimizer.state_dict() if optimizer_state is None else optimizer_state
    moments = {f"{key} of parameter {i}": v for i, entry in optimizer["state"].items()
               for key, v in entry.items() if torch.is_tensor(v)}
    if bad := first_nonfinite(tensors) or first_nonfinite(moments):
        raise NonFiniteState(f"{bad} is NaN or inf after step {state.step}: no checkpoint is written for it")
    tmp.mkdir()
    save_file(tensors, str(tmp / "trainable.safetensors"))
    if extra := method_state(objs.model):
        save_file(extra, str(tmp / METHOD_STATE))
    if objs.save_adapter:
        objs.model.save_pretrained(str(tmp / "adapter"))
        if objs.base_record is not None:
            write_base_quantization(tmp / "adapter", objs.base_record)
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(objs.scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(objs.scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state.to_dict(), indent=1))
    _fsync_tree(tmp)
    write_manifest(tmp, state.step)


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


@dataclass
class Resumed:
    """What resume_latest found: the checkpoint it restored and the newer ones it could not trust."""

    path: Path
    state: TrainState
    rejected: list[tuple[Path, str]]
    """(checkpoint, why it was not trusted), newest first; each was moved to `damaged-step-N`."""
    verified: bool
    """Whether the files were checked against sizes and hashes in the manifest (format 2)."""


def resume_latest(root: Path, objs: Checkpointable, set_aside: bool = True) -> Resumed:
    """Restore the newest checkpoint under `root` that proves itself intact.

    A damaged newer one is skipped and renamed `damaged-step-N` (so it is neither resumed from nor
    overwritten nor pruned; `set_aside=False` leaves it in place, for ranks other than the writer). If
    none is intact: ValueError naming the damaged file of each. A checkpoint of another model or method
    is no damage: its ValueError propagates (older checkpoints of the run would not match either).
    """
    rejected: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(root)):
        try:
            loaded = _read_checkpoint(path, objs)
        except CheckpointDamaged as err:
            rejected.append((path, str(err)))
            continue
        if set_aside:
            rejected = [(_set_aside(p), why) for p, why in rejected]
        _restore(loaded, objs)
        return Resumed(path, loaded.state, rejected, loaded.verified)
    if not rejected:
        raise ValueError(f"--resume: no complete checkpoint under {root}")
    raise ValueError(f"--resume: no intact checkpoint under {root}: " + "; ".join(why for _, why in rejected)
                     + ". Restore the damaged files, or train again into another output_dir")


def load_checkpoint(path: Path, objs: Checkpointable) -> TrainState:
    """Restore weights, optimizer, scheduler, scaler and RNG from `path`; return its TrainState.

    Everything is read and checked first (CheckpointDamaged naming the file), then restored.
    """
    loaded = _read_checkpoint(path, objs)
    _restore(loaded, objs)
    return loaded.state


def verify_checkpoint(path: Path) -> TrainState:
    """The TrainState of `path` if its files prove themselves and its weights are finite, else CheckpointDamaged."""
    manifest = _verified_manifest(path)
    state = _read_state(path, manifest.step)
    trainable = _read(path / "trainable.safetensors", lambda f: load_file(str(f)))
    _check_finite(path / "trainable.safetensors", trainable)
    return state


def last_good_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under `root` that verify_checkpoint accepts, or None."""
    for path in reversed(list_checkpoints(root)):
        with contextlib.suppress(CheckpointDamaged):
            verify_checkpoint(path)
            return path
    return None


_REQUIRED = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng.pt", "trainer_state.json")


@dataclass
class _Loaded:
    """A checkpoint read into memory and checked, nothing restored yet."""

    state: TrainState
    trainable: dict[str, torch.Tensor]
    method_state: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]
    verified: bool


def _read_checkpoint(path: Path, objs: Checkpointable) -> _Loaded:
    manifest = _verified_manifest(path)
    state = _read_state(path, manifest.step)
    trainable = _read(path / "trainable.safetensors", lambda f: load_file(str(f)))
    _check_matches_model(path, trainable, objs.model)
    _check_finite(path / "trainable.safetensors", trainable)
    extra = path / METHOD_STATE
    method_tensors = _read(extra, lambda f: load_file(str(f))) if METHOD_STATE in manifest.files else {}
    device = next(objs.model.parameters()).device
    file = path / "optimizer.pt"
    optimizer = check_optimizer_state(file, _read(file, lambda f: _load(f, device)), objs.optimizer, state.step,
                                      may_skip_steps=objs.scaler.is_enabled())
    file = path / "scheduler.pt"
    check_schedule_state(file, _read(file, lambda f: _load(f, "cpu")), state.step)
    file = path / "scaler.pt"
    scaler = check_scaler_state(file, _read(file, lambda f: _load(f, "cpu")), objs.scaler)
    file = path / "rng.pt"
    rng = check_rng_state(file, _read(file, lambda f: _load(f, "cpu")))
    return _Loaded(state, trainable, method_tensors, optimizer, scaler, rng, manifest.verified)


def _verified_manifest(path: Path) -> Manifest:
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (step-N)")
    manifest = verify_manifest(path, int(match.group(1)))
    if missing := [name for name in _REQUIRED if name not in manifest.files]:
        raise CheckpointDamaged(path / MANIFEST, f"does not list {', '.join(missing)}")
    return manifest


def _read_state(path: Path, step: int) -> TrainState:
    file = path / "trainer_state.json"
    raw = _read(file, lambda f: json.loads(f.read_text(encoding="utf-8")))
    try:
        state = TrainState.from_dict(raw)
    except ValueError as err:
        raise CheckpointDamaged(file, f"is not a valid trainer state: {err}") from None
    if state.step != step:
        raise CheckpointDamaged(file, f"says step {state.step}, the checkpoint is for step {step}")
    return state


def _check_matches_model(path: Path, saved: dict[str, torch.Tensor], model: nn.Module) -> None:
    params = trainable_parameters(model)
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"checkpoint {path} does not match this model/method (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); resume with the config it was trained with"
        )
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, "
                             f"the model expects {tuple(p.shape)}")


def _check_finite(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    if bad := first_nonfinite(tensors):
        raise CheckpointDamaged(file, f"holds NaN or inf in {bad}: the weights of a diverged run")


def _restore(loaded: _Loaded, objs: Checkpointable) -> None:
    """Put a checked checkpoint into the live objects; hyperparameters and schedule stay this run's config's
    (Note: the schedule of a resumed run, in train/optim.py)."""
    with torch.no_grad():
        for name, p in trainable_parameters(objs.model).items():
            saved = loaded.trainable[name]
            p.copy_(saved if objs.shard is None else objs.shard(saved, p))
    load_method_state(objs.model, loaded.method_state)
    configured = [{k: v for k, v in g.items() if k != "params"} for g in objs.optimizer.param_groups]
    objs.optimizer.load_state_dict(_shard_optimizer_state(loaded.optimizer, objs.optimizer, objs.shard))
    for group, hyper in zip(objs.optimizer.param_groups, configured, strict=True):
        group.update(hyper)
    set_schedule_step(objs.scheduler, loaded.state.step)
    if loaded.scaler:
        objs.scaler.load_state_dict(loaded.scaler)
    set_rng_state(loaded.rng)


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the step-N namespace, keeping it for inspection."""
    target = path.with_name(f"damaged-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"damaged-{path.name}-{n}")
    os.replace(path, target)
    return target


def _read(file: Path, load: Callable[[Path], Any]) -> Any:
    """load(file), with a damaged or missing file reported as CheckpointDamaged naming it."""
    try:
        return load(file)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError, ValueError,
            UnicodeDecodeError, RecursionError, KeyError) as err:
        if isinstance(err, CheckpointDamaged):
            raise
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointDamaged(file, f"is damaged or unreadable ({reason})") from None


def _load(path: Path, device: Any) -> Any:
    return torch.load(path, map_location=device, weights_only=True)


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
