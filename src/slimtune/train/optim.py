"""AdamW and the learning-rate schedule: linear warmup, then linear, cosine or constant.

Weight decay applies to matrices only (ndim >= 2): decaying biases and norm gains hurts and saves
nothing. The fused AdamW kernel is used when every parameter lives on CUDA.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from slimtune.train.config import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.adam_betas,
                             fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """LambdaLR whose factor at step s is `lr_factor(s, ...)` (same formulas as transformers)."""
    warmup = cfg.warmup_for(total_steps)

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total_steps, cfg.scheduler)

    return LambdaLR(optimizer, factor)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"train.scheduler must be linear, cosine or constant; got {kind!r}")


def set_schedule_step(scheduler: LambdaLR, step: int) -> None:
    """Put `scheduler`, and the lr of each of its optimizer's groups, at optimizer step `step`.

    # Note: the schedule of a resumed run
    A resumed run follows the schedule of the config it is resumed with, as if that config had been
    the run's from its first step: the lr of step s is lr x lr_factor(s, warmup, total) with this
    config's lr, warmup, scheduler and total steps. So a run resumed with a longer max_steps trains its
    first resumed step at the longer schedule's lr for that step (not the old schedule's final lr), and
    with an unchanged config every lr equals the uninterrupted run's. Steps already taken keep the lr
    they had. The checkpoint's scheduler state only says how many steps were taken.
    """
    scheduler.last_epoch = step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                   strict=True):
        group["lr"] = base * factor(step)
