"""Checkpoint offload: what the forward saves for backward waits in (pinned) CPU memory.

With non-reentrant gradient checkpointing, the outer autograd graph saves each checkpointed layer's
inputs (torch.utils.checkpoint keeps them through a saved-tensor Function) and the few tensors saved
outside the layers (final norm, loss head); everything inside a layer is recomputed in backward, on the
device. `offload_saved_tensors()` around the forward copies those to host memory as they are saved and
back (non-blocking from pinned memory) when backward unpacks them, so the GPU holds one layer's working
set instead of every layer's input (at 350k tokens x 4096 x bf16: 2.7 GiB per layer, 86 GiB for 32).
Parameters stay where they are (they are alive anyway: a copy would only cost time), and so do tensors
under `min_bytes`.

# Note: copies beside the compute
On CUDA the copies run on a side stream so that they overlap the layers' kernels (serialized on the
compute stream they cost the 1B LoRA b4 step 12%: 16 x 2 copies of 32 MiB over PCIe). Out: the side
stream waits for the tensor's producer, copies it to pinned memory, and the tensor is marked as used
by the side stream (record_stream), so the allocator cannot hand its memory to another tensor before
the copy has read it. Back: backward unpacks in about the reverse order of packing, so unpacking a
tensor also starts bringing back the one packed just before it (a prefetch on the side stream); the
compute stream waits on that copy's event before it reads the tensor. At most one prefetched tensor
waits on the device beyond the one in use.

# Note: exact host sizes
torch's pinned-memory cache rounds every block up to a power of two. At 350k tokens a layer input is
2.87 GB and takes a 4 GiB block, so 33 of them ask for 132 GiB and the H200 machine's 128 GiB host
kills the run. Tensors of PAGEABLE_BYTES or more therefore go to
plain (pageable) host memory of their exact size, copied synchronously on the compute stream: such a
copy takes ~0.2 s next to a layer step of seconds, and a pageable source may be freed as soon as the
copy back has been issued, so no event has to guard it.
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

PAGEABLE_BYTES = 1 << 28
"""Saved tensors this large go to pageable host memory, copied synchronously (Note: exact host sizes)."""


@dataclass
class OffloadStats:
    """What one offloaded forward moved to the host."""

    tensors: int = 0
    bytes: int = 0


class _Saved:
    """One offloaded tensor: its host copy, and its way back to the device (see Note: copies beside the compute)."""

    __slots__ = ("device", "host", "ready", "back", "back_ready", "index")

    def __init__(self, device: torch.device, host: torch.Tensor, ready: torch.cuda.Event | None, index: int = -1):
        self.device, self.host, self.ready = device, host, ready  # ready: the copy to the host is done
        self.index = index  # position in packing order (CUDA only), for the prefetch
        self.back: torch.Tensor | None = None  # prefetched device copy
        self.back_ready: torch.cuda.Event | None = None


@contextmanager
def offload_saved_tensors(min_bytes: int | None = None, pageable_bytes: int | None = None) -> Iterator[OffloadStats]:
    """Within the block, tensors saved for backward (>= min_bytes, default MIN_BYTES; not parameters)
    live on the CPU; the yielded stats count them. CUDA tensors of pageable_bytes or more (default
    PAGEABLE_BYTES) go to pageable memory (Note: exact host sizes), smaller ones to pinned memory."""
    stats = OffloadStats()
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    pageable_bytes = PAGEABLE_BYTES if pageable_bytes is None else pageable_bytes
    order: list[_Saved] = []  # in packing order, for the prefetch
    streams: dict[torch.device, torch.cuda.Stream] = {}

    def side(device: torch.device) -> torch.cuda.Stream:
        if device not in streams:
            streams[device] = torch.cuda.Stream(device)
        return streams[device]

    def pack(t: torch.Tensor) -> Any:
        size = t.numel() * t.element_size()
        if isinstance(t, nn.Parameter) or size < min_bytes or t.layout != torch.strided:
            return t
        stats.tensors, stats.bytes = stats.tensors + 1, stats.bytes + size
        if not t.is_cuda or size >= pageable_bytes:  # a synchronous copy; unpack copies it back the same way
            return _Saved(t.device, t.to("cpu", copy=True), None)
        stream = side(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        host = torch.empty_like(t, device="cpu", pin_memory=True)  # same strides: same kernels
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        t.record_stream(stream)
        saved = _Saved(t.device, host, ready, len(order))
        order.append(saved)
        return saved

    def fetch(saved: _Saved) -> None:
        """Start the copy back on the side stream (after the copy out)."""
        stream = side(saved.device)
        with torch.cuda.stream(stream):
            stream.wait_event(saved.ready)
            saved.back = saved.host.to(saved.device, non_blocking=True)
            saved.back_ready = torch.cuda.Event()
            saved.back_ready.record(stream)

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        saved: _Saved = packed
        if saved.ready is None:  # CPU or pageable: a plain copy back
            return saved.host.to(saved.device)
        if saved.back is None:
            fetch(saved)
        current = torch.cuda.current_stream(saved.device)
        current.wait_event(saved.back_ready)
        out, saved.back = saved.back, None
        out.record_stream(current)
        if saved.index > 0 and order[saved.index - 1].back is None:
            fetch(order[saved.index - 1])  # the next one backward is likely to want
        return out

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield stats
