"""Linear4bit: a frozen nn.Linear whose weight is stored as packed 4-bit NF4/FP4 codes.

Forward dequantizes the weight to the compute dtype (on CUDA: Triton, into a reused buffer, see
kernels/dispatch.py) and runs a plain matmul; backward returns only the input gradient and dequantizes again instead of keeping the full-precision weight alive, so a
layer costs ~0.5 byte per weight (+ scales) at rest and during backward. The weight is a frozen
uint8 Parameter named `weight` and the module's state_dict is bitsandbytes' Linear4bit layout
(`weight` + `weight.absmax`, `weight.quant_map`, ... see quant/state.py), so checkpoints are
interchangeable with transformers + bitsandbytes.

LoRA wraps this module as its base layer and reads `in_features`, `out_features`, `compute_dtype`,
`bias` and `dequantize()`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.kernels.dispatch import dequantize_to_buffer, use_triton
from slimtune.quant.nf4 import dequantize_4bit, quantize_4bit
from slimtune.quant.state import QuantState

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
        return dequantize_4bit(self.weight, self.quant_state).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype."""
        input_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if use_triton(x) and not (torch.is_grad_enabled() and x.requires_grad):
            # Inference on CUDA: Triton dequantization into the shared buffer, no autograd bookkeeping.
            from slimtune.kernels.lora_linear import base_matmul

            out = base_matmul(x.reshape(-1, self.in_features), self.weight, self.quant_state, bias)
            return out.reshape(*x.shape[:-1], self.out_features).to(input_dtype)
        return _Linear4bitMatmul.apply(x, self.weight, self.quant_state, bias).to(input_dtype)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={s.quant_type}, blocksize={s.blocksize}, double_quant={s.nested}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # --- device moves and serialization (nn.Module extension points) ---

    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        super()._apply(fn, recurse)
        # The quant state follows the module's device but keeps its dtypes (absmax stays fp32 even
        # under model.half()); the device is read off a probe moved by `fn`.
        device = fn(torch.empty(0, device=self.quant_state.absmax.device)).device
        if device != self.quant_state.absmax.device:
            self.quant_state = self.quant_state.to(device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
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
        # The quant-state keys are consumed here; the base class must not report them as unexpected.
        rest = {k: v for k, v in state_dict.items() if k not in quant_keys}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
