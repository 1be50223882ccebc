"""Training methods by name: how `method:` + the `peft:` section turn a base model into a trainable one.

The methods and their variants (qlora loads the base in 4 bit, dora forces `use_dora=True`) are the rows
of registry.METHODS; this module checks a run's `peft:` section against a row's config class, builds the
config, loads the base model and prepares it for training. `full` trains every parameter and has no config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from slimtune.config import PeftConfig
from slimtune.config_checks import check_values
from slimtune.kernels.llama_fused import enable_fast_path
from slimtune.peft_model import get_peft_model
from slimtune.registry import METHODS, RunMethod
from slimtune.train.schema import check_keys


def method_spec(method: str) -> RunMethod:
    """The registry row of `method` (ValueError naming the allowed methods)."""
    check_keys([method], METHODS, "method")
    return METHODS[method]


def config_fields(cls: type[PeftConfig]) -> list[str]:
    """The fields a `peft:` section may set for config class `cls`."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def check_peft_section(method: str, peft: dict[str, Any]) -> None:
    """Validate `peft:` keys and values against the method's config class, before anything loads."""
    row = method_spec(method)
    cls = row.config_class
    if cls is None:
        if peft:
            raise ValueError(f"section 'peft' must be empty for method 'full'; got keys {sorted(peft)}")
        return
    check_keys(peft, config_fields(cls), "peft")
    check_values(cls, peft, "peft.")  # types, finite numbers, patterns: before anything loads
    for key, value in row.forced.items():
        if key in peft and peft[key] != value:
            raise ValueError(f"peft.{key}: method '{method}' needs {key}={value!r}; got {peft[key]!r}")


def build_peft_config(method: str, peft: dict[str, Any], total_steps: int | None = None) -> PeftConfig:
    """The method's config object, with task_type CAUSAL_LM and (AdaLoRA) total_step filled in."""
    row = method_spec(method)
    cls = row.config_class
    if cls is None:
        raise ValueError("method 'full' has no PEFT config")
    check_peft_section(method, peft)
    fields = config_fields(cls)
    kwargs = {**peft, **row.forced}
    if "task_type" in fields and kwargs.get("task_type") is None:
        kwargs["task_type"] = "CAUSAL_LM"
    if "total_step" in fields and kwargs.get("total_step") is None and total_steps is not None:
        kwargs["total_step"] = total_steps
    return cls(**kwargs)


def load_base_model(path: str, method: str, dtype: torch.dtype, quant: Any, device: torch.device) -> nn.Module:
    """Load the causal LM at `path` (a folder or hub name); 4-bit for quantized methods."""
    if method_spec(method).quantized:
        from slimtune.quant import load_model  # lazy: only QLoRA needs the 4-bit code

        return load_model(path, quantization=quant.type, double_quant=quant.double_quant, compute_dtype=dtype,
                          device=device)
    from transformers import AutoModelForCausalLM

    # nothing unpickled, no code from the folder run
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)


def prepare_model(model: nn.Module, method: str, peft_config: PeftConfig | None,
                  gradient_checkpointing: bool) -> nn.Module:
    """Freeze/wrap `model` for `method`; trainable parameters end up fp32 (master weights).

    Gradient checkpointing is non-reentrant, so frozen embeddings need no `enable_input_require_grads`.
    """
    if method_spec(method).quantized:
        from slimtune.quant import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if peft_config is None:
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, peft_config)
        enable_fast_path(model)  # fused norms/RoPE/SwiGLU where they apply (CUDA), self-checked
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master weights; fp16 grads cannot be unscaled
    return model


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: parameter} of every trainable parameter (tied weights once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def method_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of a PEFT method's training state outside its parameters (AdaLoRA's rank allocator); {} if none."""
    get = getattr(model, "method_state", None)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get().items()} if callable(get) else {}


def load_method_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what method_state() saved ({}: none was saved); a model without such state ignores it."""
    load = getattr(model, "load_method_state", None)
    if callable(load):
        load(tensors)
