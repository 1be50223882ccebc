"""Checkpoint offload: what the forward saves for backward waits in (pinned) CPU memory.

With non-reentrant gradient checkpointing, the outer autograd graph saves each checkpointed layer's
inputs (torch.utils.checkpoint keeps them through a saved-tensor Function) and the few tensors saved
outside the layers (final norm, loss head); everything inside a layer is recomputed in backward, on the
device. `offload_saved_tensors()` around the forward copies those to host memory as they are saved and
back (non-blocking from pinned memory) when backward unpacks them, so the GPU holds one layer's working
set instead of every layer's input (at 350k tokens x 4096 x bf16: 2.7 GiB per layer, 86 GiB for 32).
Parameters stay where they are (they are alive anyway: a copy would only cost time), and so do tensors
under `min_bytes`. Work on one CUDA stream is ordered, so a non-blocking copy out of a tensor that is
freed right after is safe: the next kernel to reuse that memory runs after the copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["OffloadStats", "offload_saved_tensors"]

MIN_BYTES = 1 << 20
"""Smaller saved tensors stay on the device: a host round trip would cost more than they hold."""


@dataclass
class OffloadStats:
    """What one offloaded forward moved to the host."""

    tensors: int = 0
    bytes: int = 0


@contextmanager
def offload_saved_tensors(min_bytes: int | None = None) -> Iterator[OffloadStats]:
    """Within the block, tensors saved for backward (>= min_bytes, default MIN_BYTES; not parameters)
    live on the CPU; the yielded stats count them."""
    stats = OffloadStats()
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    pin = torch.cuda.is_available()

    def pack(t: torch.Tensor) -> Any:
        size = t.numel() * t.element_size()
        if isinstance(t, nn.Parameter) or size < min_bytes or t.layout != torch.strided:
            return t
        host = torch.empty_like(t, device="cpu", pin_memory=pin and t.is_cuda)  # same strides: same kernels
        host.copy_(t, non_blocking=pin and t.is_cuda)
        stats.tensors, stats.bytes = stats.tensors + 1, stats.bytes + size
        return t.device, host

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=host.is_pinned())

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield stats
