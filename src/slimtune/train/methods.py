"""Training methods by name: how `method:` + the `peft:` section turn a base model into a trainable one.

One table, `METHODS`, maps each name of the run YAML to the slimtune config class it builds, the
overrides it forces (dora = LoRA with `use_dora=True`), and whether the base model is loaded in 4 bit
(qlora). Adding a method is a table row; a method whose config class slimtune does not export yet
raises `MethodUnavailable` naming it. `full` trains every parameter and has no config class.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from slimtune.config_checks import check_values
from slimtune.kernels.llama_fused import enable_fast_path
from slimtune.train.schema import check_keys

# The PEFT API we build on (slimtune's own, which mirrors HF peft's names exactly).
_PEFT_API = "slimtune"


@dataclass(frozen=True)
class MethodSpec:
    """How one `method:` name prepares a model."""

    config_class: str | None
    """Name of the config class exported by slimtune; None means full fine-tuning."""
    forced: dict[str, Any] = field(default_factory=dict)
    """Config fields this method sets itself (the user may repeat them, not contradict them)."""
    quantized: bool = False
    """Load the frozen base model in 4 bit (QLoRA)."""


METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec("LoraConfig"),
    "qlora": MethodSpec("LoraConfig", quantized=True),
    "dora": MethodSpec("LoraConfig", {"use_dora": True}),
    "adalora": MethodSpec("AdaLoraConfig"),
    "ia3": MethodSpec("IA3Config"),
    "prefix_tuning": MethodSpec("PrefixTuningConfig"),
    "prompt_tuning": MethodSpec("PromptTuningConfig"),
    "p_tuning": MethodSpec("PromptEncoderConfig"),
    "full": MethodSpec(None),
}


class MethodUnavailable(ValueError):
    """The method is known but slimtune does not implement it (yet)."""


def peft_api() -> ModuleType:
    return importlib.import_module(_PEFT_API)


def method_spec(method: str) -> MethodSpec:
    check_keys([method], METHODS, "method")
    return METHODS[method]


def config_class(method: str) -> type | None:
    """The PEFT config class of `method` (None for full); MethodUnavailable if not implemented."""
    spec = method_spec(method)
    if spec.config_class is None:
        return None
    cls = getattr(peft_api(), spec.config_class, None)
    if cls is None:
        raise MethodUnavailable(
            f"method '{method}' is not available yet: slimtune has no {spec.config_class}; "
            f"available methods: {', '.join(available_methods())}"
        )
    return cls


def available_methods() -> list[str]:
    api = peft_api()
    return [m for m, s in METHODS.items() if s.config_class is None or hasattr(api, s.config_class)]


def config_fields(cls: type) -> list[str]:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]


def check_peft_section(method: str, peft: dict[str, Any]) -> None:
    """Validate `peft:` keys against the method's config class (skipped if the method is unavailable)."""
    spec = method_spec(method)
    if spec.config_class is None:
        if peft:
            raise ValueError(f"section 'peft' must be empty for method 'full'; got keys {sorted(peft)}")
        return
    try:
        cls = config_class(method)
    except MethodUnavailable:
        return  # checked when the run starts, once the method exists
    check_keys(peft, config_fields(cls), "peft")
    check_values(cls, peft, "peft.")  # types, finite numbers, patterns: before anything loads
    for key, value in spec.forced.items():
        if key in peft and peft[key] != value:
            raise ValueError(f"peft.{key}: method '{method}' needs {key}={value!r}; got {peft[key]!r}")


def build_peft_config(method: str, peft: dict[str, Any], total_steps: int | None = None) -> Any:
    """The method's config object, with task_type CAUSAL_LM and (AdaLoRA) total_step filled in."""
    cls = config_class(method)
    if cls is None:
        raise ValueError("method 'full' has no PEFT config")
    check_peft_section(method, peft)
    fields = config_fields(cls)
    kwargs = {**peft, **method_spec(method).forced}
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


def prepare_model(model: nn.Module, method: str, peft_config: Any, gradient_checkpointing: bool) -> nn.Module:
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
        model = peft_api().get_peft_model(model, peft_config)
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
