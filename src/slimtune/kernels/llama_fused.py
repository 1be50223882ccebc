"""Fused RMSNorm, RoPE and SwiGLU in Llama-family models: an explicit, per-instance module swap.

    patch_model(model) -> number of modules swapped (0: unknown architecture, mode off, no Triton)

get_peft_model calls it once on the model it wraps. For a known architecture (transformers'
LlamaForCausalLM, Qwen2 and Mistral, whose RMSNorm, MLP and attention are Llama's line for line) it
replaces, in this model only, each
    <Arch>RMSNorm   by FusedRMSNorm   (kernels/rms_norm.py)
    <Arch>MLP       by FusedSwiGLU    (kernels/swiglu.py; only when hidden_act is silu; in training with
                                       LoRA on gate, up and down: the whole MLP as kernels/lora_mlp.py)
    <Arch>Attention by FusedAttention (kernels/rope.py; q and k rotated in one launch)
The transformers classes are never modified. Unknown architectures are left untouched.

# Note: the swapped modules are the same modules
A fused module adopts the original's parameters, buffers, children and plain attributes (config,
head_dim, variance_epsilon, ...): the same objects, under the same names, so state_dict keys, LoRA
targeting (q_proj, gate_proj, ...) and saved adapters do not change, and layers injected later land
inside it as before. It remembers the original class and runs the original class's forward whenever
its kernel does not apply: off CUDA (unless mode 'on' under TRITON_INTERPRET=1, for tests), with
SLIMTUNE_FAST_PATH=off, for dtypes the kernels do not take, and, for attention, whenever a KV cache is
passed (generation): the fast attention forward covers training only. So a patched model computes
transformers' own forward everywhere the kernels are not used, bit for bit.

SLIMTUNE_FUSED_LAYERS (read by patch_model) picks which of the three are swapped: unset/on/all for all,
off for none, or a comma list of rmsnorm, rope, swiglu. The rest of the fast path (fused LoRA, Triton
dequantization) stays on: the benchmark uses it to measure what each adds.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

from slimtune.kernels.dispatch import fast_path_mode, triton_available

__all__ = ["patch_model", "kernels_apply", "FusedRMSNorm", "FusedSwiGLU", "FusedAttention", "ENV_FLAG", "KINDS",
           "enabled_kinds"]

ENV_FLAG = "SLIMTUNE_FUSED_LAYERS"
"""'off' keeps transformers' RMSNorm/RoPE/SwiGLU when the fast path is on; a comma list keeps some."""
KINDS = ("rmsnorm", "rope", "swiglu")

_ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}  # config.model_type -> prefix
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def kernels_apply(t: torch.Tensor) -> bool:
    """Whether the Triton kernels handle tensor `t`: CUDA (mode auto/on), or CPU in mode 'on' when
    TRITON_INTERPRET=1 (the interpreter; tests only); a dtype the kernels take."""
    mode = fast_path_mode()
    if mode == "off" or t.dtype not in _DTYPES or not triton_available():
        return False
    return t.is_cuda or (mode == "on" and os.environ.get("TRITON_INTERPRET") == "1")


def _adopt(new: nn.Module, old: nn.Module) -> None:
    """new takes old's parameters, buffers, children and plain attributes; see Note: the swapped modules..."""
    for key, value in vars(old).items():
        if not key.startswith("_") and key != "forward":
            object.__setattr__(new, key, value)
    for name, param in old._parameters.items():
        new.register_parameter(name, param)
    for name, buf in old._buffers.items():
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)
    for name, child in old._modules.items():
        new.add_module(name, child)
    new.plain_cls = type(old)


class FusedRMSNorm(nn.Module):
    """An <Arch>RMSNorm (weight (C,), variance_epsilon) that runs kernels/rms_norm.py where it applies."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        _adopt(self, norm)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if kernels_apply(hidden_states) and self.weight.dtype in _DTYPES:
            from slimtune.kernels.rms_norm import rms_norm

            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return self.plain_cls.forward(self, hidden_states)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"


class FusedSwiGLU(nn.Module):
    """An <Arch>MLP with SiLU: down_proj(swiglu(gate_proj(x), up_proj(x))), the middle in one kernel."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        _adopt(self, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels_apply(x):
            projections = self._lora_projections(x)
            if projections is not None:
                from slimtune.kernels.lora_mlp import lora_mlp

                out = lora_mlp(x, *projections)
                return out.to(x.dtype) if any(p.state is not None for p in projections) else out
            from slimtune.kernels.swiglu import swiglu

            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.plain_cls.forward(self, x)

    def _lora_projections(self, x: torch.Tensor) -> tuple[Any, Any, Any] | None:
        """In training, when gate, up and down are LoRA layers on the fused path with frozen biases, their
        Projections for kernels/lora_mlp.py (one op, tiled backward); else None."""
        if not torch.is_grad_enabled():
            return None
        projections = []
        for layer in (self.gate_proj, self.up_proj, self.down_proj):
            get = getattr(layer, "fused_projection", None)
            p = get(x) if get is not None else None
            if p is None or (p.bias is not None and p.bias.requires_grad):
                return None
            projections.append(p)
        return tuple(projections)


class FusedAttention(nn.Module):
    """An <Arch>Attention whose training forward applies RoPE with kernels/rope.py.

    Same steps as transformers' forward: project (B, T, C) -> q (B, T, Hq, D), k, v (B, T, Hk, D),
    rotate q and k (one launch, in the projection layout), transpose to (B, H, T, D), the configured
    attention function (eager/sdpa/flash, as config._attn_implementation says), o_proj.
    """

    def __init__(self, attn: nn.Module, architecture: str) -> None:
        super().__init__()
        _adopt(self, attn)
        self.architecture = architecture

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if (args or cache is not None or position_embeddings is None or hidden_states.dim() != 3
                or not kernels_apply(hidden_states) or not _rope_applies(*position_embeddings)):
            return self.plain_cls.forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        from slimtune.kernels.rope import apply_rope

        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)  # (B, T, Hq, D)
        k = self.k_proj(hidden_states).view(hidden_shape)  # (B, T, Hk, D)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hk, T, D)
        q, k = apply_rope(q, k, *position_embeddings, unsqueeze_dim=2)
        out, weights = self._attention_function()(
            self, q.transpose(1, 2), k.transpose(1, 2), v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
            **self._extra_kwargs(), **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights

    def _attention_function(self) -> Any:
        """transformers' choice for config._attn_implementation, the model file's eager one by default."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager = sys.modules[self.plain_cls.__module__].eager_attention_forward
        impl = self.config._attn_implementation
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
        return eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]

    def _extra_kwargs(self) -> dict[str, Any]:
        """What the architecture's forward adds to Llama's attention call (its 'main diff with Llama')."""
        if self.architecture == "qwen2":
            return {"sliding_window": getattr(self, "sliding_window", None)}
        if self.architecture == "mistral":
            return {"sliding_window": getattr(self.config, "sliding_window", None)}
        return {}


def _rope_applies(cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (cos.dim() == 3 and cos.shape == sin.shape and cos.dtype in _DTYPES and sin.dtype in _DTYPES
            and not cos.requires_grad and not sin.requires_grad)


def enabled_kinds() -> tuple[str, ...]:
    """Which of KINDS $SLIMTUNE_FUSED_LAYERS selects (all when unset)."""
    value = os.environ.get(ENV_FLAG, "").strip().lower()
    if value in ("", "on", "all", "1", "true"):
        return KINDS
    if value in ("off", "none", "0", "false"):
        return ()
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"{ENV_FLAG}={value!r}: {bad} not known; allowed: on, off, or a comma list of {KINDS}")
    return kinds


def _swap(module: nn.Module, architecture: str, kinds: tuple[str, ...]) -> nn.Module | None:
    """The fused replacement of `module`, or None when it is not one of the architecture's three (or not in kinds)."""
    prefix = _ARCHITECTURES[architecture]
    cls_name = type(module).__name__
    if not type(module).__module__.startswith(f"transformers.models.{architecture}."):
        return None
    if cls_name == f"{prefix}RMSNorm" and "rmsnorm" in kinds:
        return FusedRMSNorm(module)
    if cls_name == f"{prefix}Attention" and "rope" in kinds:
        return FusedAttention(module, architecture)
    if cls_name == f"{prefix}MLP" and "swiglu" in kinds and \
            getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish"):
        return FusedSwiGLU(module)
    return None


def patch_model(model: nn.Module) -> int:
    """Swap the RMSNorm / attention / SiLU-MLP modules of a known architecture for fused ones, in place.

    Returns the number of modules swapped: 0 for an unknown architecture, with SLIMTUNE_FAST_PATH=off or
    SLIMTUNE_FUSED_LAYERS=off, or without Triton. Calling it again swaps nothing more.
    """
    kinds = enabled_kinds()
    if fast_path_mode() == "off" or not kinds:
        return 0
    architecture = getattr(getattr(model, "config", None), "model_type", None)
    if architecture not in _ARCHITECTURES or not triton_available():
        return 0
    swapped = 0
    for name, module in list(model.named_modules()):
        new = _swap(module, architecture, kinds)
        if new is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped += 1
    return swapped
