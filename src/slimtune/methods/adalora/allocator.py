"""RankAllocator: AdaLoRA's budget schedule and sensitivity-based pruning of singular triplets.

Each adapted matrix holds r triplets (row i of A, E[i], column i of B). The importance of a triplet is
built from the smoothed sensitivity of its entries (Zhang et al. 2023, eq. 8-10):
  I = |w * dL/dw|,  Ibar <- beta1 Ibar + (1 - beta1) I,  U <- beta2 U + (1 - beta2) |I - Ibar|,  s = Ibar * U
  score_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)
and the lowest-scoring triplets across all matrices have E zeroed until the budget holds. The arithmetic
and its order are peft's, so both libraries prune the same triplets from the same gradients.
See config.py, Note: AdaLoRA's three phases, for the schedule.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from slimtune.methods.adalora.config import AdaLoraConfig
    from slimtune.methods.adalora.layer import SVDAdapter

_TRIPLET = ("lora_A", "lora_B", "lora_E")


class RankAllocator:
    """Allocates one adapter's rank budget over its matrices; the per-matrix state lives on each SVDAdapter."""

    def __init__(self, config: AdaLoraConfig, adapters: list[tuple[str, SVDAdapter]]) -> None:
        """adapters: (module name in the transformers model, adapter), in model order."""
        self.config = config
        self.adapters = adapters
        self.init_budget = sum(adapter.lora_A.shape[0] for _, adapter in adapters)
        self.target_budget = config.target_r * len(adapters)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget at `step`, whether to mask now): flat, then cubic decay, then target."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * (remaining**3) + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_sensitivity(self) -> None:
        """Fold this step's |w * grad| into the EMAs of every A, B, E entry."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for module_name, adapter in self.adapters:
            state = adapter.rank
            for name in _TRIPLET:
                param = getattr(adapter, name)
                grad = param.grad if param.grad is not None else state.last_grads.get(name)
                if grad is None:
                    raise ValueError(
                        f"AdaLoRA's update_and_allocate found no gradient for {module_name}.{name}: call it after "
                        "loss.backward() and optimizer.step() of a training step (before or after zero_grad)"
                    )
                ipt = (param * grad).abs().detach()
                if name not in state.avg_sensitivity:
                    state.avg_sensitivity[name] = torch.zeros_like(param)
                    state.avg_uncertainty[name] = torch.zeros_like(param)
                avg = beta1 * state.avg_sensitivity[name] + (1 - beta1) * ipt
                state.avg_sensitivity[name] = avg
                state.avg_uncertainty[name] = beta2 * state.avg_uncertainty[name] + (1 - beta2) * (ipt - avg).abs()

    def triplet_scores(self) -> list[torch.Tensor]:
        """Per adapter, the (r,) importance of each triplet."""
        scores = []
        for _, adapter in self.adapters:
            state = adapter.rank
            s = {n: state.avg_sensitivity[n] * state.avg_uncertainty[n] for n in _TRIPLET}
            a = torch.mean(s["lora_A"], dim=1, keepdim=True)                # (r, 1)
            b = torch.mean(s["lora_B"], dim=0, keepdim=False).view(-1, 1)   # (r, 1)
            scores.append(s["lora_E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1).view(-1))
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero E of the lowest-scoring triplets so that `budget` remain; returns the rank_pattern."""
        scores = self.triplet_scores()
        to_prune = self.init_budget - budget
        threshold = (torch.kthvalue(torch.cat(scores), k=to_prune)[0].item() if to_prune > 0 else -float("inf"))
        pattern = {}
        for (module_name, adapter), score in zip(self.adapters, scores):
            keep = ~(score <= threshold)
            adapter.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            adapter.rank.mask = keep
            pattern[f"{module_name}.lora_E"] = keep.tolist()
        return pattern

    @torch.no_grad()
    def reapply_masks(self) -> bool:
        """Zero E of the triplets pruned by the last allocation; False if no allocation happened yet."""
        found = False
        for _, adapter in self.adapters:
            if adapter.rank.mask is not None:
                adapter.lora_E.masked_fill_(~adapter.rank.mask.view(-1, 1), 0.0)
                found = True
        return found

    def reset_sensitivity(self) -> None:
        for _, adapter in self.adapters:
            adapter.rank.avg_sensitivity.clear()
            adapter.rank.avg_uncertainty.clear()


def update_and_allocate(config: AdaLoraConfig, adapters: list[tuple[str, SVDAdapter]], step: int) -> None:
    """One allocator step (peft's AdaLoraModel.update_and_allocate): call after each optimizer step.

    Writes the current mask into config.rank_pattern whenever it changes, so a save at any time writes
    matching pruned tensors and the pattern that rebuilds them.
    """
    if not adapters:
        return
    for _, adapter in adapters:
        adapter.rank.allocator_calls += 1
    allocator = RankAllocator(config, adapters)
    final_step = config.total_step - config.tfinal
    if step < final_step:
        allocator.update_sensitivity()
        budget, mask_now = allocator.budget_schedule(step)
        if mask_now:
            config.rank_pattern = allocator.mask_to_budget(budget)
    elif step == final_step:
        budget, _ = allocator.budget_schedule(step)
        config.rank_pattern = allocator.mask_to_budget(budget)
        allocator.reset_sensitivity()
    elif not allocator.reapply_masks():
        warnings.warn(
            f"AdaLoRA: step {step} is past the budgeting phase (total_step - tfinal = {final_step}) but no rank "
            "mask exists (the allocator was not called at that step, e.g. after a resume); ranks stay unpruned",
            stacklevel=3)
