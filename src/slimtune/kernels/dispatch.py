"""When the fast paths run, and the one dequantization buffer they share.

Modes (`set_fast_path`, or the environment variable SLIMTUNE_FAST_PATH=auto|on|off):
    auto  (default) fused LoRA and Triton kernels on CUDA tensors; the plain layers elsewhere.
    on    also take the fused torch paths on CPU (tests use it; Triton still needs CUDA or
          TRITON_INTERPRET=1 and is called directly there).
    off   never: every layer runs its plain, reference forward.

# Note: the reused dequantization buffer
A 4-bit layer's matmul needs its weight in the compute dtype for the length of one matmul. Allocating
that (out, in) tensor per call makes the caching allocator hold one block per distinct shape and
churn on the largest; instead every layer of a device and dtype dequantizes into one flat buffer that
grows to the largest weight (117 MB for an 8B down_proj in bf16) and is never saved for backward:
backward dequantizes again into the same buffer. Work on one CUDA stream is ordered, so the next
layer's dequantization cannot overwrite a weight whose matmul is still queued before it.
"""

from __future__ import annotations

import functools
import os

import torch

from slimtune.quant_format.nf4 import dequantize_4bit
from slimtune.quant_format.state import QuantState

__all__ = ["fast_path_mode", "set_fast_path", "triton_available", "use_fused", "use_triton",
           "dequantize_to_buffer", "dense_weight", "scratch"]

_MODES = ("auto", "on", "off")
_mode: str | None = None
_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def set_fast_path(mode: str) -> None:
    """Choose 'auto' (CUDA only), 'on' (CPU too, for tests) or 'off' (plain layers everywhere)."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"fast path mode {mode!r} is not supported; allowed: {_MODES}")
    _mode = mode


def fast_path_mode() -> str:
    """The mode in force: set_fast_path's, else $SLIMTUNE_FAST_PATH, else 'auto'."""
    if _mode is not None:
        return _mode
    mode = os.environ.get("SLIMTUNE_FAST_PATH", "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"SLIMTUNE_FAST_PATH={mode!r} is not supported; allowed: {_MODES}")
    return mode


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it is absent on CPU-only installs)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused(t: torch.Tensor) -> bool:
    """Whether the fused torch paths (fused LoRA linear) should handle tensor `t`."""
    mode = fast_path_mode()
    return mode == "on" or (mode == "auto" and t.is_cuda)


def use_triton(t: torch.Tensor) -> bool:
    """Whether a Triton kernel should handle tensor `t` (CUDA, Triton installed, mode not off)."""
    return t.is_cuda and fast_path_mode() != "off" and triton_available()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat (numel,) view of the shared buffer; see Note: the reused dequantization buffer."""
    key = (torch.device(device), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)
        del buf  # free the smaller buffer before the larger one is allocated
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_buffers() -> None:
    """Drop the shared dequantization buffers (e.g. between benchmarks)."""
    _SCRATCH.clear()


def dequantize_to_buffer(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype`: in the shared buffer via Triton on CUDA, else a new tensor.

    The result is valid until the next call on the same device and dtype; never keep it.
    """
    if use_triton(packed) and dtype in (torch.bfloat16, torch.float16, torch.float32):
        from slimtune.kernels.nf4_dequant import dequantize_4bit_triton

        if dtype != state.dtype and state.dtype != torch.float32:
            # The reference rounds to state.dtype first; a direct write would round only once.
            return dequantize_4bit_triton(packed, state, dtype=state.dtype).to(dtype)
        out = scratch(state.shape.numel(), dtype, packed.device).view(state.shape)
        return dequantize_4bit_triton(packed, state, out=out)
    return dequantize_4bit(packed, state).to(dtype)


def dense_weight(weight: torch.Tensor, state: QuantState | None, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight of a linear layer in `dtype`: a plain weight cast, or a 4-bit one (`state` given)
    dequantized by `dequantize_to_buffer` (valid until the next call on the same device and dtype)."""
    return weight.to(dtype) if state is None else dequantize_to_buffer(weight, state, dtype)
