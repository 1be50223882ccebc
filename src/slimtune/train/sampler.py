"""Which rows form each micro-batch: a per-epoch order that is a pure function of (seed, epoch).

Because the order depends on nothing else, resuming needs only (epoch, micro-batches consumed in the
epoch, seed) to continue with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    """How the rows of one epoch are cut into micro-batches."""

    n_rows: int
    """Training rows (or packed sequences)."""
    batch_size: int
    """Rows per micro-batch; the last micro-batch of an epoch may be smaller."""
    seed: int
    """Shuffling seed (the run's seed)."""
    shuffle: bool = True
    """Reshuffle every epoch; False keeps the file order."""
    lengths: tuple[int, ...] | None = None
    """Row lengths: when given, batches hold rows of similar length (data.group_by_length)."""

    def epoch(self, epoch: int) -> list[list[int]]:
        """Row indices of every micro-batch of `epoch`."""
        if self.lengths is not None:
            from slimtune.data.packing import length_grouped_batches

            return length_grouped_batches(list(self.lengths), self.batch_size, seed=self.seed * 100_003 + epoch)
        order = list(range(self.n_rows))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows).tolist()
        return [order[i : i + self.batch_size] for i in range(0, self.n_rows, self.batch_size)]

    def steps_per_epoch(self, grad_accum: int) -> int:
        """Optimizer steps in one epoch (accumulation groups never straddle two epochs)."""
        return math.ceil(math.ceil(self.n_rows / self.batch_size) / grad_accum)
