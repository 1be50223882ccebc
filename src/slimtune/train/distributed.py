"""Data-parallel training under torchrun: process group, per-rank device, batch sharding, DDP or FSDP2.

`torchrun --nproc_per_node N -m slimtune train RUN.yaml` (or `slimtune train RUN.yaml --gpus N`) starts N
processes; each calls `setup()` (process group from the env: nccl on CUDA, gloo on CPU; one device per
rank, cuda:LOCAL_RANK) and trains with `DistributedTrainer`. See docs/distributed.md.

# Note: the global batch
An optimizer step consumes the same `grad_accum` micro-batches of `batch_size` rows whatever the number
of ranks: rank r takes rows r, r+N, ... of each micro-batch. So the global batch is
batch_size x grad_accum rows on 1 or N ranks, the loss curve is the same, and the data position
(epoch, micro-batches consumed) is global: a checkpoint resumes on any number of ranks. A rank whose
shard of a (short, last) micro-batch is empty runs a row with loss weight 0 so every rank joins each
gradient reduction. The loss is token-weighted across ranks: the loss-token count of the step is
all-reduced, each rank backpropagates (its token-loss sum) x world / (global loss tokens), and the
gradient average of DDP/FSDP2 then equals the single-process gradient of the same global batch.

# Note: FSDP2 checkpoints
A checkpoint holds complete tensors in the single-process layout (train/checkpoint.py), whatever the
strategy: under FSDP2 every rank gathers the trainable parameters and the optimizer moments
(`full_tensor()`, collectives), rank 0 writes them, and on resume each rank keeps its own shard of
them (`shard_like`). The trainable part is small (adapters), so gathering it costs little; the frozen
base is never written. The same checkpoint resumes on 1 process, DDP or FSDP2 on any number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from slimtune.registry import get_method
from slimtune.train.checkpoint import latest_checkpoint, save_checkpoint
from slimtune.train.forward import Batch, forward_loss
from slimtune.train.loop import Trainer
from slimtune.train.loss import count_loss_tokens
from slimtune.train.methods import trainable_parameters

Strategy = Literal["ddp", "fsdp2"]
LOSS_WEIGHT = "loss_weight"  # key of a micro-batch whose loss counts (1) or is a placeholder (0)


def world_size() -> int:
    """Processes of this run (WORLD_SIZE set by torchrun; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs and writes files."""
    return rank() == 0


def setup(device_name: str | None) -> torch.device:
    """Join the process group from torchrun's env; return this rank's device (never device_map="auto")."""
    cpu = device_name == "cpu" or not torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if cpu else torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("gloo" if cpu else "nccl", device_id=None if cpu else device)
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_rows(idx: list[int], rank_: int, world: int) -> tuple[list[int], float]:
    """(this rank's rows of a micro-batch, loss weight); an empty shard borrows row idx[0] at weight 0."""
    mine = idx[rank_::world]
    return (mine, 1.0) if mine else (idx[:1], 0.0)


def fully_shard_model(model: nn.Module, root: nn.Module | None = None) -> nn.Module:
    """FSDP2: `fully_shard` each transformer block, then the root (in place; parameters become DTensors).

    Every parameter is sharded along dim 0, the frozen 4-bit base too: each Linear4bit first holds its
    packed codes in a float storage of its compute dtype (Note: quant storage, quant/linear4bit.py),
    which fully_shard accepts on every torch (2.11 refuses uint8 parameters) and all-gathers as bytes.
    No MixedPrecisionPolicy is passed: a param dtype would cast those bytes. Buffers and
    Linear4bit.quant_state (absmax, nested absmax, codebooks) are not parameters and stay replicated:
    1/64 byte per weight with double quantization (about 1.1 GB for a 70B model), 1/16 without.
    `root` (default `model`) is the module whose forward is called: it holds the rest (embedding,
    final norm, lm_head).
    """
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"fsdp2: no transformer block found in {type(base).__name__} (_no_split_modules is "
                         f"{sorted(block_names)}); use train.distributed ddp")
    for module in model.modules():
        if callable(getattr(module, "set_quant_storage", None)) and module.weight.dtype == torch.uint8:
            module.set_quant_storage(module.compute_dtype)
    for block in blocks:
        fully_shard(block)
    fully_shard(root if root is not None else model)
    return model


def reshard(model: nn.Module) -> None:
    """Every FSDP2 module back to its sharded parameters, on all ranks alike.

    After a no-grad forward (evaluation) the root stays unsharded; reading a state_dict reshards it, so
    doing that on rank 0 alone (the writer) would leave the ranks' next all-gathers out of step.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` (a complete saved tensor) laid out like `param`: this rank's shard of it if param is a DTensor."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return full
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank read the same file, so each slices its own shard (no communication)
    return distribute_tensor(full.to(param.device), mesh, param.placements, src_data_rank=None)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with every sharded state tensor gathered whole, on CPU; called on all ranks."""
    saved = optimizer.state_dict()
    state = {i: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in entry.items()}
             for i, entry in saved["state"].items()}
    return {"state": state, "param_groups": saved["param_groups"]}


@contextmanager
def gathered_trainables(model: nn.Module) -> Iterator[None]:
    """Within: every trainable (possibly sharded) parameter is its complete tensor; called on all ranks."""
    reshard(model)
    params = trainable_parameters(model)
    if not any(hasattr(p, "full_tensor") for p in params.values()):
        yield
        return
    saved: list[tuple[nn.Module, str, Any]] = []
    for name, p in params.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        saved.append((owner, leaf, owner._parameters[leaf]))
        owner._parameters[leaf] = nn.Parameter(_full(p.detach()).cpu(), requires_grad=True)
    try:
        yield
    finally:
        for owner, leaf, original in saved:
            owner._parameters[leaf] = original


def per_step_methods(model: nn.Module) -> list[str]:
    """The model's adapter methods with per-step bookkeeping after the optimizer step (AdaLoRA's rank allocator)."""
    configs = getattr(model, "peft_config", None) or {}
    return [c.peft_type.value.lower() for c in configs.values() if get_method(c.peft_type).on_step is not None]


class _NullLog:
    """The metrics log of ranks other than 0: they write nothing."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class DistributedTrainer(Trainer):
    """Trainer for one rank of N: shards each micro-batch, reduces gradients (DDP or FSDP2), rank 0 writes."""

    def __init__(self, model: nn.Module, *args: Any, strategy: Strategy = "ddp", **kwargs: Any):
        if strategy == "fsdp2" and (stepped := per_step_methods(model)):
            raise ValueError(f"train.distributed: fsdp2 does not take method {stepped[0]!r}: it reallocates ranks "
                             "after each step from whole gradients, which FSDP2 shards across ranks; use "
                             "train.distributed: ddp (or one GPU)")
        self.strategy, self.rank, self.world = strategy, dist.get_rank(), dist.get_world_size()
        if strategy == "fsdp2":
            fully_shard_model(model)  # before the optimizer is built on the (now DTensor) parameters
        super().__init__(model, *args, **kwargs)
        if strategy == "fsdp2":
            self.ckpt.shard = shard_like  # Note: FSDP2 checkpoints
        self.wrapped: nn.Module = model
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # frozen parameters take no part in the reduction; buffers are the same on every rank
            self.wrapped = DDP(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=False)

    def micro_batch(self, idx: list[int]) -> Batch:
        rows, weight = shard_rows(idx, self.rank, self.world)
        batch = self.collate([self.train_rows[i] for i in rows])
        batch[LOSS_WEIGHT] = torch.tensor(weight)
        return batch

    def backward(self, group: list[Batch]) -> tuple[float, int]:
        """Grads of (sum of token losses on all ranks / global loss tokens); returns the global pair."""
        self.model.train()
        local = sum(int(count_loss_tokens(b["labels"])) * float(b[LOSS_WEIGHT]) for b in group)
        n_loss_tokens = max(1, int(self._all_sum(torch.tensor(float(local), device=self.device)).item()))
        scale = self.world / n_loss_tokens  # DDP/FSDP2 average gradients over ranks: undo the 1/world
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(group):
            last = i == len(group) - 1
            with self._sync(last), self.autocast():
                loss_sum, _ = forward_loss(self.wrapped, batch, self.device, self.logits_to_keep)
                loss_sum = loss_sum * float(batch[LOSS_WEIGHT])
                loss = loss_sum * scale + self.regularization() / len(group)
            self.ckpt.scaler.scale(loss).backward()
            total += loss_sum.detach().float()
        return self._all_sum(total).item(), n_loss_tokens

    def _sync(self, last: bool) -> Any:
        """Reduce gradients only after the last micro-batch of the step."""
        if self.strategy == "ddp":
            return nullcontext() if last else self.wrapped.no_sync()  # type: ignore[operator]
        self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
        return nullcontext()

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def clip_grad_norm(self) -> float:
        """The norm over all ranks: under FSDP2 clip_grad_norm_ returns a DTensor, gathered here (DDP: a tensor)."""
        max_norm = self.cfg.max_grad_norm or float("inf")
        return float(_full(torch.nn.utils.clip_grad_norm_(self.params, max_norm)).item())

    def open_log(self) -> Any:
        return super().open_log() if self.rank == 0 else _NullLog()

    def nonfinite_parameter(self) -> str | None:
        """Agreed on by all ranks: a NaN in one rank's FSDP2 shard stops every rank before the save's collectives."""
        name = super().nonfinite_parameter()
        found = self._all_sum(torch.tensor(float(name is not None), device=self.device)).item()
        return name or ("a parameter shard of another rank" if found else None)

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (DDP replicas are identical; FSDP2 shards gathered first); all wait."""
        barrier()
        if self.strategy == "fsdp2":  # Note: FSDP2 checkpoints
            with gathered_trainables(self.model):
                optimizer_state = full_optimizer_state(self.ckpt.optimizer)
                path = save_checkpoint(self.checkpoint_dir, self.ckpt, self.state, self.cfg.keep_checkpoints,
                                       optimizer_state) if self.rank == 0 else None
        else:
            path = super().save() if self.rank == 0 else None
        barrier()
        return path or latest_checkpoint(self.checkpoint_dir) or self.checkpoint_dir


def save_on_main(model: nn.Module, write: Any) -> Any:
    """write() on rank 0 with complete trainable tensors (FSDP2 shards gathered on all ranks), then barrier."""
    if not is_distributed():
        return write()
    with gathered_trainables(model):
        result = write() if is_main() else None
    barrier()
    return result
