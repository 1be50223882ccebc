"""TrainState: where a run is (step, data position), what it has seen, and its early-stopping record.

It is the JSON part of a checkpoint; tensors (weights, optimizer moments, RNG) are stored beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainState:
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})

    def last(self, key: str) -> float | None:
        """The most recent logged value of `key`, or None."""
        return next((row[key] for row in reversed(self.history) if key in row), None)
