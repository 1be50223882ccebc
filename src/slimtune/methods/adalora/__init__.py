"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"): SVD-form
low-rank updates whose ranks are pruned during training by a global budget. On Linear, Conv1D, Linear4bit.

Training needs the allocator after every optimizer step: slimtune's trainer calls
`peft_model.update_and_allocate(step)`; under transformers.Trainer pass `callbacks=[AdaLoraCallback()]`;
in a hand-written loop call it after optimizer.step() (see config.py, Note: AdaLoRA's three phases).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimtune.adapter_layer import trainable_biases
from slimtune.architectures import column
from slimtune.methods.adalora.allocator import RankAllocator, update_and_allocate
from slimtune.methods.adalora.config import AdaLoraConfig
from slimtune.methods.adalora.layer import AdaLoraLayer, SVDAdapter, adapters_of
from slimtune.methods.adalora.state import kept_triplets, load_run_state, run_state, to_file
from slimtune.methods.spec import MethodSpec, RunStateHooks
from slimtune.targeting import default_targets, find_targets

if TYPE_CHECKING:
    from slimtune.methods.adalora.callback import AdaLoraCallback

__all__ = ["AdaLoraCallback", "AdaLoraConfig", "AdaLoraLayer", "METHOD", "RankAllocator"]


def __getattr__(name: str) -> Any:
    if name == "AdaLoraCallback":  # imports transformers: only when asked for
        from slimtune.methods.adalora.callback import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def inject(model: nn.Module, config: AdaLoraConfig, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Wrap every target module in an AdaLoraLayer and add adapter `adapter_name` (pruned per rank_pattern)."""
    if config.target_modules is None:  # as peft: the saved config names the modules it adapted
        config.target_modules = default_targets(model, column("adalora_targets"), "AdaLoRA")
    names = find_targets(model, config.target_modules, exclude_modules=config.exclude_modules,
                         layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
                         skip=config.modules_to_save or ())
    kept = kept_triplets(config, adapter_name)
    for name in names:
        layer = AdaLoraLayer.wrap(model, name, config)
        in_features, out_features = layer.features()
        pattern = kept.get(f"{name}.lora_E")
        r = config.init_r if pattern is None else sum(pattern)
        # a pruned adapter keeps the scale of the full one (peft copies ranknum = init_r on resize)
        ranknum = config.init_r if (pattern is not None and r > 0) else None
        adapter = SVDAdapter(in_features, out_features, r, config.lora_alpha, config.lora_dropout,
                             config.init_lora_weights, ranknum)
        device, dtype = layer.placement(autocast_adapter_dtype)
        layer.add(adapter_name, adapter.to(device=device, dtype=dtype))


def on_step(model: nn.Module, config: AdaLoraConfig, adapter_name: str, global_step: int) -> None:
    """MethodSpec.on_step: one rank-allocator step (PeftModel.update_and_allocate)."""
    update_and_allocate(config, adapters_of(model, adapter_name), global_step)


def orthogonality_penalty(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> torch.Tensor:
    """MethodSpec.extra_loss: orth_reg_weight * mean over matrices of ||A A^T - I||_F and ||B^T B - I||_F.

    (peft's term: Frobenius norms, not squared, averaged over every A and B, in model order.)
    """
    total: Any = 0
    count = 0
    for _, adapter in adapters_of(model, adapter_name):
        for cov in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):  # (r, r) each
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    if count == 0:
        return torch.zeros(())
    return config.orth_reg_weight * (total / count)


METHOD = MethodSpec(config_cls=AdaLoraConfig, inject=inject,
                    extra_trainable=trainable_biases, on_step=on_step, extra_loss=orthogonality_penalty,
                    to_file=to_file, run_state=RunStateHooks(get=run_state, load=load_run_state))
