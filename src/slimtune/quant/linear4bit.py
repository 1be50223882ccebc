"""Linear4bit: a frozen nn.Linear whose weight is stored as packed 4-bit NF4/FP4 codes.

Forward dequantizes the weight to the compute dtype (on CUDA: Triton, into a reused buffer, see
kernels/dispatch.py) and runs a plain matmul; backward returns only the input gradient and dequantizes again instead of keeping the full-precision weight alive, so a
layer costs ~0.5 byte per weight (+ scales) at rest and during backward. The weight is a frozen
uint8 Parameter named `weight` and the module's state_dict is bitsandbytes' Linear4bit layout
(`weight` + `weight.absmax`, `weight.quant_map`, ... see quant_format/state.py), so checkpoints are
interchangeable with transformers + bitsandbytes.

LoRA wraps this module as its base layer and reads `in_features`, `out_features`, `compute_dtype`,
`bias` and `dequantize()`.

# Note: quant storage
FSDP2 (`fully_shard`) turns every parameter into a sharded DTensor Parameter and, on torch 2.11,
refuses integer ones ("only Tensors of floating point dtype can require gradients"). As bitsandbytes'
`quant_storage` does, the packed bytes can live in a floating dtype instead: `set_quant_storage(bf16)`
re-views the (n, 1) uint8 codes as (ceil(n / 2), 1) bf16 elements (zero bytes pad the last one), the
same memory. FSDP2 shards and all-gathers them as bytes (copies only, never arithmetic), and
`packed_weight()` views them back as the (n, 1) uint8 codes where the layer dequantizes. Nothing may
cast them: `_apply` takes them out of `.half()` / `.to(dtype)`, fully_shard_model passes no
mixed-precision param dtype, and the state_dict still holds bitsandbytes' uint8 layout. The default
storage is uint8 (every single-device path); train/distributed.py sets the float one before sharding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.kernels.dispatch import dequantize_to_buffer, use_triton
from slimtune.kernels.lora_linear import base_matmul
from slimtune.quant_format.nf4 import dequantize_4bit, quantize_4bit
from slimtune.quant_format.state import QuantState

__all__ = ["Linear4bit"]


class _Linear4bitMatmul(torch.autograd.Function):
    """y = x W^T + b with W = dequantize(packed).to(x.dtype); x (..., in), W (out, in), y (..., out).

    The packed weight is frozen, so the gradients are dX = dY W: (..., out) @ (out, in), and, if the
    bias trains, db = sum of dY over all leading dims.
    Note: memory of the backward
    Only the packed (ceil(out * in / 2), 1) uint8 tensor is saved for backward; W is rebuilt
    there (one more dequantization) rather than saved from forward, which would keep a full
    (out, in) compute-dtype copy of every layer alive until backward, exactly what 4-bit
    training tries to avoid.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.state = state
        weight = dequantize_to_buffer(packed, state, x.dtype)  # (out, in), see kernels/dispatch.py
        # bias inside the same linear call, as bitsandbytes does (fused add rounds differently).
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            (packed,) = ctx.saved_tensors
            weight = dequantize_to_buffer(packed, ctx.state, grad_out.dtype)  # Note: memory of the backward
            grad_x = grad_out @ weight  # (..., out) @ (out, in) -> (..., in)
            del weight
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


class Linear4bit(nn.Module):
    """Frozen 4-bit linear layer: y = x W^T + b, W dequantized on the fly.

    Args:
        packed: (ceil(out * in / 2), 1) uint8 codes from `quantize_4bit` of a (out, in) weight.
        state: its QuantState; `state.shape` gives (out_features, in_features).
        bias: optional (out,) bias, kept in its own dtype and cast to the compute dtype in forward.
        compute_dtype: dtype of the matmul (bf16, fp16 or fp32); inputs are cast to it and the
            output is cast back to the input's dtype, as bitsandbytes' Linear4bit does.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(
                f"Linear4bit needs a 2-D (out, in) weight, got QuantState shape {tuple(state.shape)}"
            )
        if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(
                f"compute_dtype {compute_dtype} is not supported; allowed: bfloat16, float16, float32"
            )
        self.out_features, self.in_features = int(state.shape[0]), int(state.shape[1])
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(
                f"bias shape {tuple(bias.shape)} does not match out_features {self.out_features}"
            )
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.packed_bytes = packed.numel()  # n of the (n, 1) codes, whatever dtype stores them
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.quant_state = state
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """Quantize `linear.weight` (on its device); compute_dtype defaults to the weight's dtype."""
        packed, state = quantize_4bit(
            linear.weight.data, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant
        )
        bias = None if linear.bias is None else linear.bias.data.clone()
        return cls(packed, state, bias, compute_dtype or linear.weight.dtype)

    def dequantize(self) -> torch.Tensor:
        """The full weight (out_features, in_features) in the compute dtype (for merges and exports)."""
        return dequantize_4bit(self.packed_weight(), self.quant_state).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype."""
        input_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if use_triton(x) and not (torch.is_grad_enabled() and x.requires_grad):
            # Inference on CUDA: fused decode GEMV for <= 4 rows, else Triton dequantization + cuBLAS.
            out = base_matmul(x.reshape(-1, self.in_features), self.packed_weight(), self.quant_state, bias)
            return out.reshape(*x.shape[:-1], self.out_features).to(input_dtype)
        return _Linear4bitMatmul.apply(x, self.packed_weight(), self.quant_state, bias).to(input_dtype)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={s.quant_type}, blocksize={s.blocksize}, double_quant={s.nested}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # --- storage of the packed bytes (Note: quant storage) ---

    def set_quant_storage(self, dtype: torch.dtype) -> None:
        """Hold the packed codes in a `dtype` Parameter (same bytes; torch.uint8 gives the (n, 1) codes back)."""
        if dtype != torch.uint8 and not dtype.is_floating_point:
            raise TypeError(f"Linear4bit quant storage {dtype} is not supported; allowed: torch.uint8 or a float dtype")
        if _is_sharded(self.weight):
            raise RuntimeError("Linear4bit.set_quant_storage: the weight is already sharded; set it before fully_shard")
        codes = self.packed_weight().reshape(-1)
        if dtype != torch.uint8:
            size = torch.empty((), dtype=dtype).element_size()
            padded = codes.new_zeros(-(-codes.numel() // size) * size)
            padded[: codes.numel()] = codes
            codes = padded.view(dtype)
        self.weight = nn.Parameter(codes.reshape(-1, 1), requires_grad=False)

    def packed_weight(self) -> torch.Tensor:
        """The (n, 1) uint8 codes, a view of the weight whatever dtype stores them (no copy)."""
        if self.weight.dtype == torch.uint8:
            return self.weight
        return self.weight.reshape(-1).view(torch.uint8)[: self.packed_bytes].reshape(-1, 1)

    # --- device moves and serialization (nn.Module extension points) ---

    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        storage = self.weight.dtype
        if storage != torch.uint8 and not _is_sharded(self.weight):
            self.set_quant_storage(torch.uint8)  # a dtype cast must not touch the bytes (Note: quant storage)
        super()._apply(fn, recurse)
        if self.weight.dtype != storage:
            self.set_quant_storage(storage)
        # The quant state follows the module's device but keeps its dtypes (absmax stays fp32 even
        # under model.half()); the device is read off a probe moved by `fn`.
        device = fn(torch.empty(0, device=self.quant_state.absmax.device)).device
        if device != self.quant_state.absmax.device:
            self.quant_state = self.quant_state.to(device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.dtype != torch.uint8 and not _is_sharded(self.weight):
            destination[f"{prefix}weight"] = self.packed_weight().detach()  # bitsandbytes' uint8 layout
        for key, value in self.quant_state.as_dict(prefix=f"{prefix}weight.").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        state_prefix = f"{prefix}weight."
        quant_keys = {k: v for k, v in state_dict.items() if k.startswith(state_prefix)}
        if f"{prefix}weight" in state_dict:
            self.quant_state = QuantState.from_dict(
                quant_keys, prefix=state_prefix, device=self.weight.device
            )
        storage = self.weight.dtype
        if storage != torch.uint8 and not _is_sharded(self.weight):
            self.set_quant_storage(torch.uint8)  # the file holds uint8 codes (Note: quant storage)
        # The quant-state keys are consumed here; the base class must not report them as unexpected.
        rest = {k: v for k, v in state_dict.items() if k not in quant_keys}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.weight.dtype == torch.uint8:
            self.packed_bytes = self.weight.numel()
        if storage != self.weight.dtype:
            self.set_quant_storage(storage)


def _is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2 shard): its bytes are only viewed back, inside forward, once all-gathered."""
    return hasattr(t, "device_mesh")
