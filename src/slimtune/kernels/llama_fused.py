"""Fused RMSNorm, RoPE and SwiGLU in Llama-family models: an explicit, self-checking opt-in.

    enable_fast_path(model) -> number of modules that run fused forwards (0: nothing applies, or the check failed)
    disable_fast_path(model) -> number of modules given back their own forward

Nothing in slimtune calls this behind the user's back: `get_peft_model` leaves the model's modules alone,
as peft does. `slimtune train` and the benchmarks call `enable_fast_path` themselves; API users call it
once, after `get_peft_model` and after moving the model to its GPU. For a known architecture
(Architecture.fused_prefix in architectures.py: transformers' Llama, Qwen2 and Mistral, whose RMSNorm, MLP
and attention are Llama's line for line) each
    <Arch>RMSNorm    runs kernels/rms_norm.py
    <Arch>MLP        runs kernels/swiglu.py (hidden_act silu only; in training with LoRA on gate, up and
                     down: the whole MLP as kernels/lora_mlp.py)
    <Arch>Attention  rotates q and k with kernels/rope.py (training forwards; a KV cache takes the original)

# Note: a fast forward is an instance attribute, never a new module
The fast path sets `module.forward` on the instance (a FastForward that holds the module), exactly as
accelerate's hooks do. The module stays the object transformers built: its type (isinstance holds), its
hooks, its per-instance state (hub-kernel tables and anything a library attached), its parameters and
state_dict keys. Wherever a kernel does not apply (another device or dtype, a KV cache, an argument the
fast forward does not know) FastForward calls `type(module).forward(module, ...)`: the class's own
forward on an object that class built. A module whose forward is already replaced per instance (an
accelerate hook, a hub kernel from `kernelize`) is left alone. `disable_fast_path` deletes the attribute.

# Note: the self-check
A transformers release we have never seen may change what these modules compute. So enable_fast_path
first runs the model on a tiny input without the fast forwards (logits with autograd on, as in training,
and one cached generation step), then with them, and keeps them only if both agree within round-off of
the dtype. On any mismatch or error the model is left exactly as it was, with one warning naming the
transformers version: slimtune is then slower, never wrong. The check draws no random numbers from the
global generators and leaves every .grad as it was.

SLIMTUNE_FUSED_LAYERS picks which of the three run fused: unset/on/all for all, off for none, or a comma
list of rmsnorm, rope, swiglu. The rest of the fast path (fused LoRA, Triton dequantization) stays on:
the benchmark uses it to measure what each adds.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimtune.architectures import for_model_type
from slimtune.kernels.dispatch import fast_path_mode, triton_available

__all__ = ["enable_fast_path", "disable_fast_path", "fast_modules", "kernels_apply", "FastForward", "ENV_FLAG",
           "KINDS", "enabled_kinds"]

ENV_FLAG = "SLIMTUNE_FUSED_LAYERS"
"""'off' keeps transformers' RMSNorm/RoPE/SwiGLU when the fast path is on; a comma list keeps some."""
KINDS = ("rmsnorm", "rope", "swiglu")

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Relative L2 error allowed between the fused and the original logits in the self-check: fp32 round-off,
# bf16/fp16 round-off of a few layers. A wrong rotation or norm gives errors of order 1.
_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def kernels_apply(t: torch.Tensor) -> bool:
    """Whether the Triton kernels handle tensor `t`: CUDA (mode auto/on), or CPU in mode 'on' when
    TRITON_INTERPRET=1 (the interpreter; tests only); a dtype the kernels take."""
    mode = fast_path_mode()
    if mode == "off" or t.dtype not in _DTYPES or not triton_available():
        return False
    return t.is_cuda or (mode == "on" and os.environ.get("TRITON_INTERPRET") == "1")


def _rms_norm(module: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """x (..., C) / rms(x) * weight (C,), or NotImplemented where the kernel does not apply."""
    if args or kwargs or not kernels_apply(hidden_states) or module.weight.dtype not in _DTYPES:
        return NotImplemented
    from slimtune.kernels.rms_norm import rms_norm

    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _swiglu(module: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with the middle (or, for three LoRA layers in training,
    the whole MLP) in one kernel; NotImplemented where it does not apply."""
    if args or kwargs or not kernels_apply(x):
        return NotImplemented
    projections = lora_projections(module, x)
    if projections is not None:
        from slimtune.kernels.lora_mlp import lora_mlp

        out = lora_mlp(x, *projections)
        return out.to(x.dtype) if any(p.state is not None for p in projections) else out
    from slimtune.kernels.swiglu import swiglu

    return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x)))


def lora_projections(mlp: nn.Module, x: torch.Tensor) -> tuple[Any, Any, Any] | None:
    """In training, when gate, up and down are LoRA layers on the fused path with frozen biases, their
    Projections for kernels/lora_mlp.py (one op, tiled backward); else None."""
    if not torch.is_grad_enabled():
        return None
    projections = []
    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        get = getattr(layer, "fused_projection", None)
        p = get(x) if get is not None else None
        if p is None or (p.bias is not None and p.bias.requires_grad):
            return None
        projections.append(p)
    return tuple(projections)


def _attention(module: nn.Module, hidden_states: torch.Tensor, position_embeddings: Any = None,
               attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
    """The training forward of an <Arch>Attention with q and k rotated by kernels/rope.py.

    Same steps as transformers' forward: project (B, T, C) -> q (B, T, Hq, D), k, v (B, T, Hk, D), rotate
    q and k (one launch, in the projection layout), transpose to (B, H, T, D), the configured attention
    function (eager/sdpa/flash, as config._attn_implementation says), o_proj. A KV cache, a positional
    argument past the mask, or inputs the kernel does not take: NotImplemented.
    """
    if (args or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
            or position_embeddings is None or hidden_states.dim() != 3 or not kernels_apply(hidden_states)
            or not _rope_applies(*position_embeddings)):
        return NotImplemented
    from slimtune.kernels.rope import apply_rope

    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    q = module.q_proj(hidden_states).view(hidden_shape)  # (B, T, Hq, D)
    k = module.k_proj(hidden_states).view(hidden_shape)  # (B, T, Hk, D)
    v = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hk, T, D)
    q, k = apply_rope(q, k, *position_embeddings, unsqueeze_dim=2)
    out, weights = _attention_function(module)(
        module, q.transpose(1, 2), k.transpose(1, 2), v, attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout, scaling=module.scaling,
        **_extra_attention_kwargs(module), **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return module.o_proj(out), weights


def _attention_function(module: nn.Module) -> Callable[..., Any]:
    """transformers' choice for config._attn_implementation, the model file's eager one by default."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(module).__module__].eager_attention_forward
    impl = module.config._attn_implementation
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]


def _extra_attention_kwargs(module: nn.Module) -> dict[str, Any]:
    """What the architecture's forward adds to Llama's attention call (its 'main diff with Llama')."""
    architecture = module.config.model_type
    if architecture == "qwen2":
        return {"sliding_window": getattr(module, "sliding_window", None)}
    if architecture == "mistral":
        return {"sliding_window": getattr(module.config, "sliding_window", None)}
    return {}


def _rope_applies(cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (cos.dim() == 3 and cos.shape == sin.shape and cos.dtype in _DTYPES and sin.dtype in _DTYPES
            and not cos.requires_grad and not sin.requires_grad)


_FORWARDS: dict[str, Callable[..., Any]] = {"rmsnorm": _rms_norm, "rope": _attention, "swiglu": _swiglu}


class FastForward:
    """`module.forward` while the fast path is on: the fused forward of `kind` where it applies, else the
    module's own class forward. See Note: a fast forward is an instance attribute, never a new module."""

    def __init__(self, module: nn.Module, kind: str) -> None:
        self.module, self.kind, self.active = module, kind, True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.active:
            out = _FORWARDS[self.kind](self.module, *args, **kwargs)
            if out is not NotImplemented:
                return out
        return type(self.module).forward(self.module, *args, **kwargs)

    def __repr__(self) -> str:
        return f"FastForward({type(self.module).__name__}, {self.kind})"


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


def _kind(module: nn.Module, architecture: str, kinds: tuple[str, ...]) -> str | None:
    """Which fused forward `module` takes, or None (not one of the architecture's three, not in kinds,
    or its forward already replaced per instance by someone else)."""
    if "forward" in vars(module):
        return None
    cls = type(module)
    if not cls.__module__.startswith(f"transformers.models.{architecture}."):
        return None
    prefix = for_model_type(architecture).fused_prefix
    if cls.__name__ == f"{prefix}RMSNorm" and "rmsnorm" in kinds:
        return "rmsnorm"
    if cls.__name__ == f"{prefix}Attention" and "rope" in kinds:
        return "rope"
    if cls.__name__ == f"{prefix}MLP" and "swiglu" in kinds and \
            getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish"):
        return "swiglu"
    return None


def fast_modules(model: nn.Module) -> dict[str, str]:
    """{module name: kind} of the modules of `model` that run a fast forward now."""
    return {name: m.forward.kind for name, m in model.named_modules() if isinstance(vars(m).get("forward"), FastForward)}


def disable_fast_path(model: nn.Module) -> int:
    """Give every module of `model` its own forward back; returns how many had a fast one."""
    count = 0
    for module in model.modules():
        if isinstance(vars(module).get("forward"), FastForward):
            del module.forward
            count += 1
    return count


def enable_fast_path(model: nn.Module, check: bool = True) -> int:
    """Run the fused RMSNorm / RoPE / SwiGLU forwards in `model`'s Llama-family modules, in place.

    Call it after get_peft_model and after moving the model to its device. Returns how many modules run a
    fast forward: 0 for an unknown architecture, a device or dtype the kernels do not take (CPU), mode off,
    SLIMTUNE_FUSED_LAYERS=off, no Triton, or a failed self-check (see Note: the self-check; it warns once).
    Calling it again adds nothing.
    """
    kinds = enabled_kinds()
    config = getattr(model, "config", None)
    architecture = getattr(config, "model_type", None)
    if fast_path_mode() == "off" or not kinds or for_model_type(architecture).fused_prefix is None or \
            not triton_available():
        return 0
    weight = _first_float_weight(model)
    if weight is None or not kernels_apply(weight):
        return 0
    chosen = [(m, k) for m in model.modules() if (k := _kind(m, architecture, kinds)) is not None]
    if not chosen:
        return 0
    reference = _probe(model) if check else None
    for module, kind in chosen:
        module.forward = FastForward(module, kind)
    if reference is not None:
        problem = _compare(reference, model, weight.dtype)
        if problem is not None:
            for module, _ in chosen:
                del module.forward
            _warn_unpatched(architecture, problem)
            return 0
    return len(chosen)


def _first_float_weight(model: nn.Module) -> torch.Tensor | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p
    return None


def _warn_unpatched(architecture: str, problem: str) -> None:
    import transformers

    warnings.warn(
        f"slimtune's fused RMSNorm/RoPE/SwiGLU do not match transformers {transformers.__version__}'s "
        f"{architecture} modules ({problem}); this model runs transformers' own forwards (correct, slower)",
        RuntimeWarning, stacklevel=3)


def _probe(model: nn.Module) -> dict[str, Any] | str:
    """The model's outputs on a tiny input (see Note: the self-check), or the error it raised, as a string."""
    from transformers import DynamicCache

    modes = [(m, m.training) for m in model.modules()]
    device = _first_float_weight(model).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits.detach().float()
            with torch.no_grad():
                cache = {_cache_keyword(model): DynamicCache(config=model.config)}
                model(input_ids=ids[:, :-1], use_cache=True, **cache)
                step = model(input_ids=ids[:, -1:], use_cache=True, **cache).logits.float()
        return {"logits": logits, "cached step": step}
    except Exception as err:  # noqa: BLE001 - any failure means: do not use the fast path
        return f"{type(err).__name__}: {err}"
    finally:
        for module, training in modes:
            module.training = training
        for n, p in model.named_parameters():
            if n in grads:
                p.grad = grads[n]


def _cache_keyword(model: nn.Module) -> str:
    """The name under which this transformers version's model forward takes a KV cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _compare(reference: dict[str, Any] | str, model: nn.Module, dtype: torch.dtype) -> str | None:
    """None when the fused model reproduces `reference`, else what differed."""
    if isinstance(reference, str):
        return f"the original model failed the check input: {reference}"
    got = _probe(model)
    if isinstance(got, str):
        return f"the fused forward raised {got}"
    tolerance = _CHECK_TOLERANCE.get(dtype, 3e-2)
    for key, want in reference.items():
        if got[key].shape != want.shape:
            return f"{key}: shape {tuple(got[key].shape)} != {tuple(want.shape)}"
        error = ((got[key] - want).norm() / want.norm().clamp_min(1e-12)).item()
        if not error <= tolerance:  # also catches NaN
            return f"{key}: relative error {error:.2e} > {tolerance:.0e}"
    return None
