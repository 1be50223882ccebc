"""AdaLoraLayer: wraps a linear-like layer (nn.Linear, GPT-2 Conv1D, Linear4bit) and adds SVD-form updates.

forward(x) = base_layer(x) + dropout(x) (A * E)^T B^T * lora_alpha / (ranknum + 1e-5), the update
P diag(E) Q of AdaLoRA with Q = lora_A (r, in), E = lora_E (r, 1) the singular values, P = lora_B (out, r).
The rank allocator prunes by zeroing entries of E (see config.py, Note: AdaLoRA's three phases) and
keeps its state on each adapter (`SVDAdapter.rank`). Merging folds B (A * E) into the base weight; a 4-bit
base is merged only through `unloaded(merge=True)`, which returns a plain nn.Linear.

# Note: pruned tensors on disk
peft saves an AdaLoRA adapter with only the kept triplets (rows of A and E, columns of B, as listed in
rank_pattern) and rebuilds those shapes on load. In memory the shapes stay at init_r during training (the
optimizer holds the full tensors), and so does state_dict(), which transformers.Trainer and slimtune's own
checkpoints resume from; only save_pretrained writes the pruned tensors (`state.to_file`, as peft's
resize_state_dict_by_rank_pattern). An adapter built from a config with rank_pattern has the pruned shapes
from the start. The allocator's averages and masks travel in checkpoints too (`state.run_state`), so a
run resumed mid-pruning prunes exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import torch
from torch import nn

from slimtune.adapter_layer import AdapterLayerBase

_TRIPLET = ("lora_A", "lora_B", "lora_E")


@dataclasses.dataclass
class RankState:
    """What the allocator keeps per adapter between steps; checkpoints carry the averages and the mask (state.py)."""

    avg_sensitivity: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """EMA of |w * grad| per tensor name (lora_A, lora_B, lora_E)."""
    avg_uncertainty: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """EMA of |sensitivity - its EMA| per tensor name."""
    mask: torch.Tensor | None = None
    """(r,) bool, the triplets kept by the last allocation; None before the first one."""
    last_grads: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """The gradient tensors of the last backward, so the allocator still sees them after zero_grad(set_to_none)."""
    allocator_calls: int = 0
    """How many times update_and_allocate reached this adapter."""
    train_forwards: int = 0
    """Forward passes in training mode with gradients on (to detect a run that never calls the allocator)."""
    warned: bool = False


def _remember_grad(state: RankState, name: str, param: torch.Tensor) -> None:
    state.last_grads[name] = param.grad


class SVDAdapter(nn.Module):
    """One AdaLoRA adapter: lora_A (r, in), lora_E (r, 1), lora_B (out, r), ranknum (1,) (not saved, as in peft).

    Creation consumes the random stream in peft's order (randn A, E, B, ranknum; then the init), so the
    same seed gives the same initial weights as peft.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 init: bool, ranknum: int | None = None) -> None:
        super().__init__()
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.randn(r, in_features))
        self.lora_E = nn.Parameter(torch.randn(r, 1))
        self.lora_B = nn.Parameter(torch.randn(out_features, r))
        rank = torch.randn(1).fill_(float(r if ranknum is None else ranknum))
        self.register_buffer("ranknum", rank, persistent=False)
        self.scaling = alpha
        self.rank = RankState()
        self._hooked: dict[str, int] = {}
        self._ensure_grad_hooks()
        if init:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def _ensure_grad_hooks(self) -> None:
        """Let the allocator see each backward's gradients even after zero_grad(set_to_none=True).

        Hooks live on the Parameter objects, which deepcopy and load_state_dict(assign=True) replace: the
        ids tell whether the current parameters carry them.
        """
        for name in _TRIPLET:
            param = getattr(self, name)
            if self._hooked.get(name) != id(param):
                param.register_post_accumulate_grad_hook(functools.partial(_remember_grad, self.rank, name))
                self._hooked[name] = id(param)

    def delta_weight(self) -> torch.Tensor:
        """B (A * E) * scaling / ranknum, shape (out, in), as peft computes it."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution (x already in the adapter dtype); peft's exact expression."""
        if self.training and torch.is_grad_enabled():
            self.rank.train_forwards += 1
            self._ensure_grad_hooks()
        return (self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / (
            self.ranknum + 1e-5)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """The full init_r tensors (see Note: pruned tensors on disk), with a warning if the allocator never ran."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        self._warn_if_allocator_never_ran()

    def _warn_if_allocator_never_ran(self) -> None:
        state = self.rank
        if state.train_forwards and not state.allocator_calls and not state.warned:
            state.warned = True
            warnings.warn(
                f"AdaLoRA adapter ran {state.train_forwards} training forward passes but its rank allocator was "
                "never called, so no rank was pruned. Call peft_model.update_and_allocate(step) after each "
                "optimizer.step() (slimtune's trainer does); with transformers.Trainer pass "
                "callbacks=[slimtune.methods.adalora.AdaLoraCallback()]", stacklevel=4)


class AdaLoraLayer(AdapterLayerBase):
    """A base layer plus named AdaLoRA adapters (see adapter_layer.AdapterLayer)."""

    method = "AdaLoRA"

    def _stored(self, delta: torch.Tensor) -> torch.Tensor:
        """A delta (out, in) in the layout of the stored weight."""
        return delta.T if self.fan_in_fan_out else delta

    # ---- merging (AdapterLayerBase) -----------------------------------------------------------
    def merge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.data += self._stored(self.adapters[name].delta_weight()).to(weight.dtype)

    def unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.data -= self._stored(self.adapters[name].delta_weight()).to(weight.dtype)

    def folded(self, name: str, weight: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight + self.adapters[name].delta_weight().float(), bias

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        pending = self.pending()
        if self.disabled or not pending:
            return result
        out_dtype = result.dtype
        for name in pending:
            adapter = self.adapters[name]
            xa = x if torch.is_autocast_enabled(x.device.type) else x.to(adapter.lora_A.dtype)
            result = result + adapter(xa)
        return result.to(out_dtype)


def adapters_of(model: nn.Module, adapter_name: str) -> list[tuple[str, SVDAdapter]]:
    """(module name, adapter) for every AdaLoraLayer holding `adapter_name`, in model order."""
    return [(name, module.adapters[adapter_name]) for name, module in model.named_modules()
            if isinstance(module, AdaLoraLayer) and adapter_name in module.adapters]
