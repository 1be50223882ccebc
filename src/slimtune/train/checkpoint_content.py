"""What each file of a checkpoint must hold, checked before anything is restored from it.

A file can pass its manifest hash and still be wrong for this run (a checkpoint written by another tool,
a format 1 manifest without hashes), and torch.load of a valid file returns whatever was saved: `{}` as
an optimizer would otherwise end in a KeyError deep inside torch. Each check raises CheckpointDamaged
naming the file and what it lacks. The numbers must be finite too: a checkpoint holding NaN weights or
moments is a diverged run, never a place to resume from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimtune.train.manifest import CheckpointDamaged

__all__ = ["check_optimizer_state", "check_rng_state", "check_scaler_state", "check_schedule_state",
           "first_nonfinite"]


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf, or None."""
    return next((n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def check_optimizer_state(file: Path, saved: Any, optimizer: torch.optim.Optimizer, step: int,
                          may_skip_steps: bool) -> dict[str, Any]:
    """`saved` if it is a state dict of `optimizer` (same groups and sizes) at optimizer step `step`.

    Adam counts its own steps per parameter; the newest of those counts is `step`, or at most `step` when a
    GradScaler may have skipped steps (fp16).
    """
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        raise CheckpointDamaged(file, f"holds {_kind(saved)}, not an optimizer state (keys 'state', 'param_groups')")
    groups = optimizer.param_groups
    params = [p for g in groups for p in g["params"]]
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in saved["param_groups"]]
    if sizes != [len(g["params"]) for g in groups]:
        raise CheckpointDamaged(file, f"has parameter groups of {sizes} parameters; this run's optimizer has "
                                      f"{[len(g['params']) for g in groups]}")
    newest = 0.0
    for i, entry in saved["state"].items():
        if not isinstance(i, int) or not 0 <= i < len(params) or not isinstance(entry, dict):
            raise CheckpointDamaged(file, f"has state for parameter {i!r}, which this run's optimizer does not have")
        for key, value in entry.items():
            if not torch.is_tensor(value) and not isinstance(value, int | float):
                raise CheckpointDamaged(file, f"has a {type(value).__name__} as {key!r} of parameter {i}")
            if key == "step":
                newest = max(newest, float(value))
            elif torch.is_tensor(value) and value.dim() and value.shape != params[i].shape:
                raise CheckpointDamaged(file, f"has {key!r} of parameter {i} with shape {tuple(value.shape)}, "
                                              f"the parameter has {tuple(params[i].shape)}")
        if bad := first_nonfinite({k: v for k, v in entry.items() if torch.is_tensor(v)}):
            raise CheckpointDamaged(file, f"holds NaN or inf in {bad!r} of parameter {i}: a diverged run's state")
    if saved["state"] and (newest > step or (newest < step and not may_skip_steps)):
        raise CheckpointDamaged(file, f"is from optimizer step {newest:g}, the checkpoint is for step {step}")
    return saved


def check_schedule_state(file: Path, saved: Any, step: int) -> None:
    """A learning-rate scheduler state that has stepped `step` times."""
    if not isinstance(saved, dict) or "last_epoch" not in saved:
        raise CheckpointDamaged(file, f"holds {_kind(saved)}, not a learning-rate scheduler state (key 'last_epoch')")
    if saved["last_epoch"] != step or isinstance(saved["last_epoch"], bool):
        raise CheckpointDamaged(file, f"is at scheduler step {saved['last_epoch']!r}, the checkpoint is for step {step}")


_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def check_scaler_state(file: Path, saved: Any, scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """A GradScaler state: {} from a disabled scaler (fp32/bf16 runs), else every key of an enabled one."""
    if not isinstance(saved, dict):
        raise CheckpointDamaged(file, f"holds {_kind(saved)}, not a gradient scaler state")
    if saved and (missing := [k for k in _SCALER_KEYS if k not in saved]):
        raise CheckpointDamaged(file, f"lacks {', '.join(missing)} of a gradient scaler state")
    if saved and not (isinstance(saved["scale"], float | int) and 0 < saved["scale"] < float("inf")):
        raise CheckpointDamaged(file, f"has the loss scale {saved['scale']!r}; it must be a finite number > 0")
    if not saved and scaler.is_enabled():
        raise ValueError(f"checkpoint {file.parent} was trained without fp16 loss scaling; resume it with the "
                         "train.precision it was trained with")
    return saved


def check_rng_state(file: Path, saved: Any) -> dict[str, Any]:
    """The RNG states of rng.rng_state(): python, numpy, torch and CUDA."""
    if not isinstance(saved, dict) or sorted(saved) != ["cuda", "numpy", "python", "torch"]:
        raise CheckpointDamaged(file, f"holds {_kind(saved)}, not the RNG states (python, numpy, torch, cuda)")
    python, numpy = saved["python"], saved["numpy"]
    ok = (isinstance(python, tuple | list) and len(python) == 3 and isinstance(python[1], tuple | list)
          and all(isinstance(x, int) for x in python[1])
          and isinstance(numpy, dict) and torch.is_tensor(numpy.get("keys")) and numpy["keys"].numel() == 624
          and all(isinstance(numpy.get(k), t) for k, t in (("name", str), ("pos", int), ("has_gauss", int),
                                                           ("cached_gaussian", float)))
          and _is_byte_state(saved["torch"])
          and isinstance(saved["cuda"], list) and all(_is_byte_state(s) for s in saved["cuda"]))
    if not ok:
        raise CheckpointDamaged(file, "holds RNG states of the wrong types or sizes")
    return saved


def _is_byte_state(t: Any) -> bool:
    return torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1 and t.numel() > 0


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))[:6]}" if value else "an empty dict"
    return f"a {type(value).__name__}"
