"""The training loop: setup, then for each optimizer step: train_step, maybe evaluate, maybe save.

Trainer works on any causal LM whose trainable parameters are already chosen (PEFT-wrapped or fully
trainable) and on tokenized rows `{"input_ids": [...], "labels": [...]}` turned into batches by
`collate`. The loss is token-weighted over the whole accumulated step (see slimtune.train.loss), and
the data order is a pure function of (seed, epoch) (see slimtune.train.sampler), which is what makes
`resume` bit-exact: weights, optimizer, scheduler, scaler, RNG and data position all come back.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from slimtune.adapter_base import BaseQuantization
from slimtune.train.checkpoint import (
    Checkpointable,
    NonFiniteState,
    last_good_checkpoint,
    resume_latest,
    save_checkpoint,
)
from slimtune.train.config import TrainConfig
from slimtune.train.cuda_graphs import GraphSteps, auto_enabled
from slimtune.train.device import autocast_dtype, model_device
from slimtune.train.forward import Batch, Row, evaluation_loss, forward_loss, supports_logits_to_keep
from slimtune.train.logs import MetricsLog, ProgressBar, memory_gb
from slimtune.train.loss import count_loss_tokens
from slimtune.train.methods import trainable_parameters
from slimtune.train.offload import offload_saved_tensors
from slimtune.train.optim import build_optimizer, build_scheduler
from slimtune.train.rng import seed_everything
from slimtune.train.sampler import BatchPlan
from slimtune.train.schema import to_plain
from slimtune.train.state import LogWindow, TrainState
from slimtune.train.trackers import open_trackers, require_installed


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the run stopped without saving."""


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, train_rows: Sequence[Row],
                 eval_rows: Sequence[Row] | None, collate: Callable[[list[Row]], Batch], output_dir: Path,
                 *, plan: BatchPlan | None = None, save_adapter: bool = True,
                 base_record: BaseQuantization | None = None, progress: bool = True,
                 console: Console | None = None, run_config: Mapping[str, Any] | None = None):
        if not train_rows:
            raise ValueError("no training rows: the data file is empty or every row was skipped")
        self.model, self.cfg, self.collate = model, cfg, collate
        self.train_rows, self.eval_rows = train_rows, eval_rows or []
        self.output_dir, self.show_progress = Path(output_dir), progress
        # what the trackers record as the run's parameters: the whole run config, else the train section
        self.run_config = run_config if run_config is not None else {"train": to_plain(cfg)}
        require_installed(cfg.report_to)
        self.resuming = False
        self.console = console or Console(stderr=True)
        self.device = model_device(model)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.params = list(trainable_parameters(model).values())
        self.logits_to_keep = supports_logits_to_keep(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.plan = plan or BatchPlan(len(train_rows), cfg.batch_size, cfg.seed)
        self.total_steps = cfg.total_steps(self.plan.steps_per_epoch(cfg.grad_accum))
        optimizer = build_optimizer(self.params, cfg)
        self.ckpt = Checkpointable(
            model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, self.total_steps),
            scaler=torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16),
            save_adapter=save_adapter, base_record=base_record,
        )
        self.state = TrainState(data_seed=self.plan.seed)
        self.graphs = self.build_graphs()

    def build_graphs(self) -> Any:
        """The micro-batch graphs (train/cuda_graphs.py) as train.cuda_graphs says: true (an error where they
        cannot run), auto (only where they run and were checked against eager: cuda_graphs.auto_enabled), false."""
        mode = self.cfg.cuda_graphs
        if mode is False or (mode == "auto" and not auto_enabled(self.model, self.device, self.amp_dtype, self.cfg)):
            return None
        graphs = GraphSteps(self.model, self.params, self.amp_dtype)
        self.console.print(f"CUDA graphs on (train.cuda_graphs: {str(mode).lower()}): each batch shape is "
                           "captured on first use, then replayed")
        return graphs

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    # ----------------------------------------------------------------------------------- the run
    def fit(self, resume: bool = False) -> TrainState:
        """Train until max_steps/epochs or early stopping; checkpoint periodically and at the end."""
        if resume:
            self.resume()
        else:
            seed_everything(self.cfg.seed)  # dropout and the rest start from the seed, whatever ran before
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.resuming = resume
        log = self.open_log()
        failed = True
        try:
            with ProgressBar(self.total_steps, self.state.step, self.console, self.show_progress) as bar:
                for group in self.groups():
                    started = time.perf_counter()
                    self.state.window.add(self.train_step(group), time.perf_counter() - started)
                    if self.state.step % self.cfg.log_every == 0 or self.state.step == self.total_steps:
                        self.record(self.train_row(), log, bar)
                        self.state.window = LogWindow()
                    bar.advance_to(self.state.step)
                    if self.cfg.eval_every and self.state.step % self.cfg.eval_every == 0:
                        self.record(self.evaluate(), log, bar)
                    if self.state.step % self.cfg.save_every == 0 and not self.finished():
                        self.save_finite()
                if self.eval_rows and self.state.last("eval_step") != self.state.step:
                    self.record(self.evaluate(), log, bar)
                self.save_finite()
            failed = False
        finally:
            log.close(failed)
        return self.state

    def open_log(self) -> MetricsLog:
        """metrics.jsonl and the trackers of train.report_to, continuing their runs when resuming."""
        last = self.state.history[-1]["step"] if self.state.history else None
        trackers = open_trackers(self.cfg.report_to, self.output_dir, self.run_config, self.resuming, last,
                                 self.console)
        return MetricsLog(self.output_dir, self.state.history, trackers)

    def finished(self) -> bool:
        return self.state.step >= self.total_steps or self.state.stop_reason is not None

    def groups(self) -> Iterator[list[Batch]]:
        """Accumulation groups of collated micro-batches, from the data position on, until finished()."""
        s, cfg = self.state, self.cfg
        while True:
            batches = self.plan.epoch(s.epoch)
            while s.batch_in_epoch < len(batches):
                if self.finished():
                    return
                chunk = batches[s.batch_in_epoch : s.batch_in_epoch + cfg.grad_accum]
                yield [self.micro_batch(idx) for idx in chunk]
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0

    def micro_batch(self, idx: list[int]) -> Batch:
        """The collated rows `idx` (a rank of a distributed run takes its shard: train.distributed)."""
        return self.collate([self.train_rows[i] for i in idx])

    # ------------------------------------------------------------------------------------- step
    def train_step(self, group: list[Batch]) -> dict[str, float]:
        """One optimizer step over `group`; loss = sum of token losses / loss tokens in the group."""
        loss_sum_value, n_loss_tokens = self.backward(group)
        if not math.isfinite(loss_sum_value):
            loss = loss_sum_value / n_loss_tokens
            raise TrainingDiverged(self.diverged_message(f"loss is {loss} at step {self.state.step + 1}"))
        lr = self.ckpt.optimizer.param_groups[0]["lr"]
        grad_norm = self.optimizer_step()
        self.state.step += 1
        self.state.batch_in_epoch += len(group)
        tokens = sum(_input_tokens(b) for b in group)
        self.state.tokens_seen += tokens
        return {"loss_sum": loss_sum_value, "loss_tokens": n_loss_tokens, "tokens": tokens,
                "grad_norm": grad_norm, "lr": lr}

    def backward(self, group: list[Batch]) -> tuple[float, int]:
        """Accumulate grads of (sum of token losses / loss tokens in the whole group); return both."""
        self.model.train()
        n_loss_tokens = max(1, int(sum(count_loss_tokens(b["labels"]) for b in group)))
        total = torch.zeros((), device=self.device)
        for batch in group:
            if self.graphs is not None and self.graphs.takes(batch):  # Note: graphs in the SFT loop
                total += self.graphs(batch, n_loss_tokens)
                continue
            with self.autocast(), self.offload():
                loss_sum, _ = forward_loss(self.model, batch, self.device, self.logits_to_keep)
                loss = loss_sum / n_loss_tokens + self.regularization() / len(group)  # penalty once per step
            self.ckpt.scaler.scale(loss).backward()
            total += loss_sum.detach()
        return total.item(), n_loss_tokens

    def regularization(self) -> torch.Tensor | float:
        """The PEFT method's training penalty (AdaLoRA's orthogonality term), else 0."""
        penalty = getattr(self.model, "regularization_loss", None)
        value = penalty() if callable(penalty) else None
        return 0.0 if value is None else value

    def optimizer_step(self) -> float:
        """Unscale, clip (clip_grad_norm), step the optimizer and scheduler, the method's per-step bookkeeping,
        clear the grads; returns the gradient norm before clipping."""
        scaler, optimizer = self.ckpt.scaler, self.ckpt.optimizer
        scaler.unscale_(optimizer)
        grad_norm = self.clip_grad_norm()
        scaler.step(optimizer)
        scaler.update()
        self.ckpt.scheduler.step()
        update_and_allocate = getattr(self.model, "update_and_allocate", None)
        if callable(update_and_allocate):  # PEFT per-step bookkeeping (AdaLoRA ranks: reads the grads)
            update_and_allocate(self.state.step)
        optimizer.zero_grad(set_to_none=self.graphs is None or not self.graphs.owns_grads)  # graphs add into .grad
        return grad_norm

    def clip_grad_norm(self) -> float:
        """Clip the (unscaled) gradients to train.max_grad_norm; returns their total norm before clipping."""
        max_norm = self.cfg.max_grad_norm or math.inf  # inf: measure the norm, clip nothing
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm).item()

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def offload(self) -> Any:
        """Saved tensors to pinned CPU memory when train.offload_checkpoints (see slimtune.train.offload)."""
        return offload_saved_tensors() if self.cfg.offload_checkpoints else nullcontext()

    def diverged_message(self, what: str) -> str:
        """`what` went wrong, naming the newest checkpoint that verifies and has finite weights."""
        last = last_good_checkpoint(self.checkpoint_dir)
        kept = f"the last good checkpoint is {last}" if last else "there is no good checkpoint yet"
        return (f"{what}: training diverged and stopped; {kept}. "
                "Try a lower train.lr, train.max_grad_norm, or train.precision bf16/fp32")

    def nonfinite_parameter(self) -> str | None:
        """Name of a trainable parameter holding NaN or inf (this process's shard of it), or None."""
        for name, p in trainable_parameters(self.model).items():
            local = p.to_local() if callable(getattr(p, "to_local", None)) else p
            if not torch.isfinite(local).all():
                return name
        return None

    def train_row(self) -> dict[str, Any]:
        """The metrics row of the steps in state.window."""
        s = self.state
        return {"step": s.step, "epoch": s.epoch, **s.window.averages(), "tokens_seen": s.tokens_seen,
                "memory_gb": round(memory_gb(self.device), 3)}

    # --------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Token-weighted eval loss and perplexity over all eval rows; updates early stopping."""
        eval_loss, n_tokens = evaluation_loss(self.model, self.eval_rows, self.collate, self.cfg.batch_size,
                                              self.amp_dtype, self.logits_to_keep)
        self.model.train()
        self.update_early_stopping(eval_loss)
        return {"step": self.state.step, "eval_step": self.state.step, "eval_loss": eval_loss,
                "eval_ppl": math.exp(min(eval_loss, 700.0)), "eval_tokens": n_tokens}

    def update_early_stopping(self, eval_loss: float) -> None:
        s = self.state
        if s.best_eval_loss is None or eval_loss < s.best_eval_loss:
            s.best_eval_loss, s.best_step, s.evals_without_improvement = eval_loss, s.step, 0
            return
        s.evals_without_improvement += 1
        patience = self.cfg.early_stopping_patience
        if patience is not None and s.evals_without_improvement >= patience:
            s.stop_reason = "early_stopping"

    def record(self, row: dict[str, Any], log: MetricsLog, bar: ProgressBar) -> None:
        self.state.history.append(row)
        log.write(row)
        if "loss" in row:
            bar.update(self.state.step, row)
        if "eval_loss" in row:
            bar.print(f"step {row['step']}: eval loss {row['eval_loss']:.4f}  ppl {row['eval_ppl']:.2f}")
        if self.state.stop_reason == "early_stopping" and "eval_loss" in row:
            bar.print(f"early stopping: no better eval loss in {self.cfg.early_stopping_patience} evaluations")

    # ------------------------------------------------------------------------------------- save
    def save_finite(self) -> Path:
        """Save a checkpoint, unless the weights hold NaN or inf: then stop, naming the last good one."""
        if (name := self.nonfinite_parameter()) is not None:
            raise TrainingDiverged(self.diverged_message(f"{name} is NaN or inf after step {self.state.step} "
                                                         "(not saved)"))
        try:
            return self.save()
        except NonFiniteState as err:
            raise TrainingDiverged(self.diverged_message(str(err))) from None

    def save(self) -> Path:
        return save_checkpoint(self.checkpoint_dir, self.ckpt, self.state, self.cfg.keep_checkpoints)

    def resume(self) -> Path:
        """Restore the newest intact checkpoint (saying which newer ones were damaged and set aside)."""
        writer = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                      and torch.distributed.get_rank() != 0)
        resumed = resume_latest(self.checkpoint_dir, self.ckpt, set_aside=writer)
        for path, why in resumed.rejected:
            self.console.print(f"[yellow]{why}. Not resuming from it: moved to {path}[/yellow]", soft_wrap=True)
        if not resumed.verified:
            self.console.print(f"[yellow]{resumed.path} has no file checksums (manifest format 1): its files "
                               "were checked for content, not for damage[/yellow]", soft_wrap=True)
        self.state = resumed.state
        if self.state.data_seed != self.plan.seed:  # the data order stays the one the run started with
            self.plan = dataclasses.replace(self.plan, seed=self.state.data_seed)
        self.console.print(f"resuming from {resumed.path} (step {self.state.step})", soft_wrap=True)
        return resumed.path


def _input_tokens(batch: Batch) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()
