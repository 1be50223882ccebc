"""TrainConfig: the `train:` section of a run's YAML — optimisation, schedule, precision and cadence.

Defaults live here and nowhere else; the YAML file is only this dataclass serialized. Each field's
docstring becomes the `slimtune train --help` text (see `slimtune.train.docs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from slimtune.train.trackers import check_names

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Scheduler = Literal["linear", "cosine", "constant"]
Distributed = Literal["ddp", "fsdp2"]


@dataclass
class TrainConfig:
    max_steps: int | None = None
    """Optimizer steps to run; overrides `epochs` when set (epochs then repeat as needed)."""
    epochs: int = 1
    """Passes over the training rows when `max_steps` is null."""
    lr: float = 2.0e-4
    """Peak learning rate of AdamW (reached after warmup)."""
    batch_size: int = 4
    """Rows (or packed sequences) per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; the loss is averaged over all their loss tokens."""
    max_seq_len: int = 2048
    """Longest tokenized sequence; longer rows are truncated or skipped by the data pipeline."""
    seed: int = 0
    """Seed for adapter init, dropout and data shuffling; the same seed gives the same losses."""
    save_every: int = 200
    """Write a checkpoint every this many optimizer steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep under output_dir/checkpoints."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to `lr`; exclusive with `warmup_ratio`."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps, in [0, 1); exclusive with `warmup_steps`."""
    scheduler: Scheduler = "linear"
    """Learning-rate decay after warmup: linear (to 0), cosine (to 0) or constant."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to matrices only (not biases or norms)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; null disables clipping."""
    precision: Precision = "auto"
    """fp32, bf16 (autocast), fp16 (autocast + loss scaling), or auto: bf16 on a bf16 GPU, else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant) to save memory at ~30% more compute. Measured on
    an H200, 8B QLoRA at batch 1 x 2048 tokens with graphs: 6.9 GiB peak at 10.4k tok/s with it, 13.0 GiB
    at 14.8k without (docs/benchmarks.md)."""
    offload_checkpoints: bool = False
    """With gradient_checkpointing: keep each layer's saved input in CPU memory until backward (long
    contexts: frees seq x hidden x 2 bytes per layer on the GPU, for one host copy each way). The host
    needs that much RAM: 8B at 350k tokens, ~90 GiB (pinned below 256 MiB a tensor, pageable above)."""
    cuda_graphs: bool | Literal["auto"] = "auto"
    """Replay each micro-batch's forward + backward as a CUDA graph, one per (rows, length rounded up to
    128) (train/cuda_graphs.py): removes the launch overhead of small steps. true: on, with an error where
    it cannot run (CPU, fp16, multi-GPU, AdaLoRA, prompt learning, ...); auto: on for LoRA/QLoRA without
    DoRA on one CUDA device in bf16/fp32 without offload_checkpoints, else off; false: off. Packed or
    left-padded batches always run eagerly."""
    eval_every: int | None = None
    """Evaluate (loss, perplexity) every this many steps; null evaluates only at the end."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a lower eval loss; needs `eval_every`."""
    log_every: int = 10
    """Write a metrics row (loss, lr, tokens/s, memory) every this many steps."""
    device: str | None = None
    """torch device to train on, e.g. cuda:0 or cpu; null picks cuda when available."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower on GPU; CPU runs are deterministic anyway)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that get the run config and every metrics row: any of tensorboard (under
    output_dir/tensorboard; skipped with a notice if not installed), wandb, mlflow, trackio (each needs its
    package: pip install 'slimtune[tracking]'); [] logs to metrics.jsonl only. See docs/tracking.md."""
    distributed: Distributed = "ddp"
    """Under torchrun (or --gpus N): ddp replicates the model, fsdp2 shards it (fully_shard per block)."""

    def __post_init__(self) -> None:
        positive = ("epochs", "lr", "batch_size", "grad_accum", "max_seq_len", "save_every",
                    "keep_checkpoints", "log_every")
        for key in positive:
            if not 0 < getattr(self, key) < math.inf:  # NaN fails too
                raise ValueError(f"train.{key} must be > 0 and finite, got {getattr(self, key)!r}")
        for key in ("max_steps", "eval_every", "early_stopping_patience", "max_grad_norm"):
            value = getattr(self, key)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"train.{key} must be > 0 (finite) or null, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("train.warmup_steps and train.warmup_ratio are exclusive: set only one")
        if not 0 <= self.seed < 2**63:  # torch, numpy and the sampler all take it
            raise ValueError(f"train.seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"train.adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise ValueError("train.offload_checkpoints needs train.gradient_checkpointing: true (it offloads the "
                             "checkpointed layers' inputs; without checkpointing it would copy every activation)")
        if self.cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"train.cuda_graphs must be true, false or auto, got {self.cuda_graphs!r}")
        if self.cuda_graphs is True and self.precision == "fp16":
            raise ValueError("train.cuda_graphs does not take precision fp16 (its loss scaler steps on the host); "
                             "allowed: bf16, fp32 or auto")
        if self.cuda_graphs is True and self.offload_checkpoints:
            raise ValueError("train.cuda_graphs and train.offload_checkpoints do not combine (host copies inside "
                             "a graph); choose one")
        check_names(self.report_to)
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("train.early_stopping_patience needs train.eval_every (how often to evaluate)")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps for a run of `total_steps` optimizer steps."""
        return self.warmup_steps or int(self.warmup_ratio * total_steps)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run: max_steps, else epochs x steps_per_epoch."""
        return self.max_steps or self.epochs * steps_per_epoch
