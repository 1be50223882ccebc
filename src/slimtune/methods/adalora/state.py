"""What an AdaLoRA adapter writes where: pruned triplets in the PEFT file, full training state in checkpoints.

See layer.py, Note: pruned tensors on disk. `to_file` is peft's resize_state_dict_by_rank_pattern: rows of
lora_A and lora_E and columns of lora_B that rank_pattern marks as kept; a tensor already at the kept rank
(an adapter loaded from a pruned file) is written as it is. `run_state` / `load_run_state` carry the rank
allocator's state (RankState: the sensitivity and uncertainty averages, the mask) through checkpoints,
keyed '<module>.mask' and '<module>.<lora_A|lora_E|lora_B>.<avg_sensitivity|avg_uncertainty>'.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.methods.adalora.config import AdaLoraConfig
from slimtune.methods.adalora.layer import SVDAdapter, adapters_of

_TRIPLET = ("lora_A", "lora_E", "lora_B")
_AVERAGES = ("avg_sensitivity", "avg_uncertainty")
_FILE_PREFIX = "base_model.model."  # PEFT's file keys of a layer method: base_model.model.<module>.lora_A


def kept_triplets(config: AdaLoraConfig, adapter_name: str) -> dict[str, list[bool]]:
    """rank_pattern keyed '<module>.lora_E' (peft's file form; its in-memory form also ends in '.<adapter>')."""
    suffix = f".{adapter_name}"
    return {(k[: -len(suffix)] if k.endswith(suffix) else k): v for k, v in (config.rank_pattern or {}).items()}


def to_file(tensors: dict[str, torch.Tensor], config: AdaLoraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    """MethodSpec.to_file: keep only the triplets rank_pattern marks as kept (modules it does not name stay whole)."""
    out = dict(tensors)
    for key, kept in kept_triplets(config, adapter_name).items():
        module = _FILE_PREFIX + key.removesuffix(".lora_E")
        r = sum(kept)
        for name in _TRIPLET:
            file_key = f"{module}.{name}"
            if file_key not in out:
                continue  # rank_pattern names a module this adapter does not adapt: nothing to write
            tensor, dim = out[file_key], (1 if name == "lora_B" else 0)
            if tensor.shape[dim] == r:
                continue
            if tensor.shape[dim] != len(kept):
                raise ValueError(
                    f"rank_pattern[{key!r}] lists {len(kept)} triplets ({r} kept) but {file_key} has rank "
                    f"{tensor.shape[dim]}; the pattern does not belong to this adapter")
            keep = torch.tensor(kept, device=tensor.device)
            out[file_key] = tensor[keep] if dim == 0 else tensor[:, keep]
    return out


def adapters_by_module(model: nn.Module, adapter_name: str) -> dict[str, SVDAdapter]:
    return dict(adapters_of(model, adapter_name))


def run_state(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    """RunStateHooks.get: every adapter's allocator averages (between the first call and the final step) and mask."""
    out: dict[str, torch.Tensor] = {}
    for module, adapter in adapters_by_module(model, adapter_name).items():
        state = adapter.rank
        if state.mask is not None:
            out[f"{module}.mask"] = state.mask
        for field in _AVERAGES:
            for name, tensor in getattr(state, field).items():
                out[f"{module}.{name}.{field}"] = tensor
    return out


def load_run_state(model: nn.Module, config: AdaLoraConfig, adapter_name: str,
                   tensors: dict[str, torch.Tensor]) -> None:
    """RunStateHooks.load: replace every adapter's allocator state; masks also rebuild config.rank_pattern."""
    remaining = dict(tensors)
    pattern: dict[str, list[bool]] = {}
    for module, adapter in adapters_by_module(model, adapter_name).items():
        state = adapter.rank
        state.mask = None
        mask = remaining.pop(f"{module}.mask", None)
        if mask is not None:
            _check_shape(f"{module}.mask", mask, (adapter.lora_E.shape[0],), torch.bool)
            state.mask = mask.to(adapter.lora_E.device)
            pattern[f"{module}.lora_E"] = state.mask.tolist()
        for field in _AVERAGES:
            averages = getattr(state, field)
            averages.clear()
            for name in _TRIPLET:
                key, param = f"{module}.{name}.{field}", getattr(adapter, name)
                if key in remaining:
                    tensor = remaining.pop(key)
                    _check_shape(key, tensor, tuple(param.shape), param.dtype)
                    averages[name] = tensor.to(param.device)
        if set(state.avg_sensitivity) != set(state.avg_uncertainty):
            raise ValueError(f"AdaLoRA state of {module}: avg_sensitivity has {sorted(state.avg_sensitivity)} but "
                             f"avg_uncertainty has {sorted(state.avg_uncertainty)}; the checkpoint is damaged")
    if remaining:
        raise ValueError(f"AdaLoRA state {', '.join(sorted(remaining)[:3])} fits no adapted module of this model; "
                         "resume with the model and config the checkpoint was trained with")
    if pattern:
        config.rank_pattern = pattern


def _check_shape(key: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise ValueError(f"AdaLoRA state {key} is {tensor.dtype} {tuple(tensor.shape)}, the model expects "
                         f"{dtype} {shape}; resume with the model and config the checkpoint was trained with")
