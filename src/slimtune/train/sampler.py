"""Which rows form each micro-batch: a per-epoch permutation that is a pure function of (seed, epoch).

Because the order depends on nothing else, resuming needs only (epoch, micro-batches consumed in the
epoch, seed) to continue with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math

import numpy as np


def epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of every micro-batch of `epoch`; the last one may be smaller."""
    order = np.random.default_rng([seed, epoch]).permutation(n_rows).tolist()
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def steps_per_epoch(n_rows: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch (accumulation groups never straddle two epochs)."""
    return math.ceil(math.ceil(n_rows / batch_size) / grad_accum)
