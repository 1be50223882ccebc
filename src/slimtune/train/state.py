"""TrainState: where a run is (step, data position), what it has seen, and its early-stopping record.

It is the JSON part of a checkpoint; tensors (weights, optimizer moments, RNG) are stored beside it.
`TrainState.from_dict` type-checks what it reads: a checkpoint's trainer_state.json is trusted only
when every field is there with its type and the fields agree with each other (no history row after
the step, no best step in the future).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LogWindow:
    """Sums over the optimizer steps since the last metrics row.

    A checkpoint carries it, so that the first row after a resume averages the same steps it would have
    averaged without the interruption (save_every need not be a multiple of log_every).
    """

    steps: int = 0
    """Optimizer steps in the window."""
    loss_sum: float = 0.0
    """Sum of the token losses of those steps."""
    loss_tokens: int = 0
    """Loss tokens of those steps."""
    tokens: int = 0
    """Input tokens (padding excluded) of those steps."""
    seconds: float = 0.0
    """Time spent inside those steps (tokens/s); time between processes does not count."""
    grad_norm: float = 0.0
    """Gradient norm of the newest step."""
    lr: float = 0.0
    """Learning rate of the newest step."""

    def add(self, metrics: dict[str, float], seconds: float) -> None:
        self.steps += 1
        self.loss_sum += metrics["loss_sum"]
        self.loss_tokens += int(metrics["loss_tokens"])
        self.tokens += int(metrics["tokens"])
        self.seconds += seconds
        self.grad_norm, self.lr = metrics["grad_norm"], metrics["lr"]

    def averages(self) -> dict[str, float]:
        """loss (token-weighted), lr, grad_norm and tokens_per_s of the window."""
        return {"loss": self.loss_sum / max(1, self.loss_tokens), "lr": self.lr, "grad_norm": self.grad_norm,
                "tokens_per_s": self.tokens / max(self.seconds, 1e-9)}

    @classmethod
    def from_dict(cls, raw: Any) -> LogWindow:
        values = _fields(cls, raw, "window", required={f.name for f in dataclasses.fields(cls)})
        for name in ("steps", "loss_tokens", "tokens"):
            _check(values[name], _is_count, f"window.{name}", "an integer >= 0")
        for name in ("loss_sum", "seconds", "grad_norm", "lr"):
            _check(values[name], _is_finite, f"window.{name}", "a finite number")
        return cls(**values)


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epoch of the next micro-batch."""
    batch_in_epoch: int = 0
    """Micro-batches of `epoch` already consumed."""
    data_seed: int = 0
    """Seed of the per-epoch shuffles (see sampler.epoch_batches)."""
    tokens_seen: int = 0
    """Input tokens (padding excluded) trained on so far."""
    best_eval_loss: float | None = None
    """Lowest eval loss so far."""
    best_step: int | None = None
    """Step of `best_eval_loss`."""
    evals_without_improvement: int = 0
    """Evaluations since the last new best (early stopping)."""
    stop_reason: str | None = None
    """Why the run ended early ("early_stopping"), or None."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every metrics row logged so far (train and eval)."""
    window: LogWindow = field(default_factory=LogWindow)
    """The steps since the last metrics row, not logged yet."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> TrainState:
        """The state in `raw`, or ValueError naming the first missing, unknown, mistyped or inconsistent field.

        `window` may be absent (manifest format 1 checkpoints have none): an empty window.
        """
        values = _fields(cls, raw, "trainer state", required={f.name for f in dataclasses.fields(cls)} - {"window"})
        for name in ("step", "epoch", "batch_in_epoch", "tokens_seen", "evals_without_improvement"):
            _check(values[name], _is_count, name, "an integer >= 0")
        _check(values["data_seed"], _is_int, "data_seed", "an integer")
        _check(values["best_eval_loss"], lambda v: v is None or _is_number(v), "best_eval_loss", "a number or null")
        _check(values["best_step"], lambda v: v is None or _is_count(v), "best_step", "an integer >= 0 or null")
        _check(values["stop_reason"], lambda v: v is None or isinstance(v, str), "stop_reason", "a string or null")
        _check(values["history"], lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "history",
               "a list of objects")
        values["window"] = LogWindow.from_dict(values["window"]) if "window" in values else LogWindow()
        state = cls(**values)
        state.check_consistent()
        return state

    def check_consistent(self) -> None:
        """ValueError unless the fields agree: history and best step not after `step`, history in order."""
        if (self.best_step is None) != (self.best_eval_loss is None):
            raise ValueError(f"best_step {self.best_step} and best_eval_loss {self.best_eval_loss} must both be set "
                             "or both be null")
        if self.best_step is not None and self.best_step > self.step:
            raise ValueError(f"best_step {self.best_step} is after step {self.step}")
        previous = 0
        for i, row in enumerate(self.history):
            if not _is_count(row.get("step")) or not previous <= row["step"] <= self.step:
                raise ValueError(f"history row {i} has step {row.get('step')!r}; rows must be in order, "
                                 f"from 0 to step {self.step}")
            previous = row["step"]
        if self.window.steps > self.step:
            raise ValueError(f"window of {self.window.steps} steps is longer than the run's {self.step} steps")

    def last(self, key: str) -> float | None:
        """The most recent logged value of `key`, or None."""
        return next((row[key] for row in reversed(self.history) if key in row), None)


def _fields(cls: type, raw: Any, what: str, required: set[str]) -> dict[str, Any]:
    """The entries of `raw` that are fields of `cls`; ValueError if `raw` is no object or keys are missing/unknown."""
    if not isinstance(raw, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    if missing := sorted(required - set(raw)):
        raise ValueError(f"{what} lacks {', '.join(missing)}")
    if unknown := sorted(set(raw) - known):
        raise ValueError(f"{what} has unknown keys {', '.join(map(str, unknown))}")
    return dict(raw)


def _check(value: Any, ok: Any, name: str, allowed: str) -> None:
    if not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_count(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)
