"""CUDA graphs in `slimtune train` (train.cuda_graphs): each micro-batch's forward + backward replayed as
a graph, one graph per (rows, length bucket); `capture_step` and `MaskReplay` are the capture itself.

    steps = GraphSteps(model, params, amp_dtype)     # the Trainer builds it when train.cuda_graphs
    if steps.takes(batch):
        loss_sum = steps(batch, n_loss_tokens)       # grads of loss_sum / n_loss_tokens accumulate in .grad
    ...
    optimizer.zero_grad(set_to_none=False)           # the graphs own the .grad tensors: zero them in place

# Note: graphs in the SFT loop
A graph replays one fixed-shape step. SFT batches differ in length, their loss tokens differ in number
and place, and several micro-batches add into one gradient. So:
  * a batch is right-padded (pad id 0, label IGNORE_INDEX) to its length rounded up to BUCKET tokens, and
    each (rows, bucket) gets its own static input tensors and graph; the graphs share one memory pool
    (they replay one after another on one stream, never at once). The pads change no loss or gradient:
    causal attention never reaches them from a real token and their labels carry no loss (loss.py,
    Note: right padding needs no attention mask), so the batch goes in with no attention mask at all;
  * the loss is the chunked cross-entropy from hidden states over every position, IGNORE_INDEX skipped
    (fixed shapes; the eager loop computes only the positions that carry loss, so the sum is the same up
    to rounding), times a static 1 / n_loss_tokens that is refilled before each replay;
  * accumulation: the graphs add into .grad tensors that exist before the first capture and are never
    replaced (AccumulateGrad adds in place when a gradient exists); the trainer zeroes them in place. A
    capture that did not add in place (another torch) is refused: the run goes on eagerly;
  * a bucket's first call runs the step once eagerly on the capture stream (lazy state, workspaces, the
    attention-mask decision), takes that gradient back out, captures, and replays: every step of a bucket
    is a replay. That is what keeps a resumed run bit-identical to an uninterrupted one (tests/train/
    test_gpu.py): had the first calls of a bucket been eager steps, a resumed process would run eagerly
    the steps that the first process replayed, whose kernels and so bits can differ. If a capture fails,
    every later batch runs eagerly (the loop's own eager path) and `reason` says why.
Batches that cannot be replayed run eagerly (`takes` is False): packed rows (position_ids), left padding
or any padding that loss.drop_right_padding_mask does not accept (no Architecture.mask_free, a
non-SDPA attention). Attention masks under capture: Note: transformers' masks under capture.

# Note: transformers' masks under capture
transformers lets SDPA run its causal kernel (is_causal=True, no mask tensor) only after host-side
checks (no padding, no packed sequences in position_ids), and while a CUDA stream is capturing it skips
them and builds a dense (B, 1, T, T) mask instead. Captured that way, the H200's cuDNN attention ran 3x
slower (1B LoRA b4: 1.37 against 0.48 ms per backward call, ~26 ms per step). Telling transformers
that nothing is capturing does not work: its checks then sync with the host and the capture fails.
So MaskReplay watches the attention modules (class name ending in "Attention") in the
eager warmup calls, on the same static inputs: a module that got attention_mask=None there gets None
again during the capture, in place of the dense mask, and computes what it computed eagerly. This is
only right while every batch is like the warmup's: a batch with padding (an attention mask with zeros)
must not go through a graph captured on one without. Packed rows (position_ids restarting per sample)
must not be captured at all: transformers skips its packed-sequence detection under capture and would
build a plain causal mask, attending across samples. GraphSteps therefore buckets by length with one graph
each, leaves right padding unmasked and refuses packed rows (Note: graphs in the SFT loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimtune.train.forward import hidden_forward_loss
from slimtune.train.loss import IGNORE_INDEX, drop_right_padding_mask, loss_head

__all__ = ["BUCKET", "WARMUP", "GraphSteps", "MaskReplay", "auto_enabled", "capture_step", "graphs_unsupported"]

BUCKET = 128
"""Sequence lengths are rounded up to a multiple of this: at most max_seq_len / BUCKET graphs per row count."""
WARMUP = 0
"""Eager training calls of a bucket before its capture (see Note: graphs in the SFT loop: 0 keeps resume exact)."""


@dataclass
class _Bucket:
    """Static inputs of one (rows, length) shape, and its graph once captured."""

    ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long
    positions: torch.Tensor  # (L - 1,) every position
    inv_n: torch.Tensor  # () fp32: 1 / loss tokens of the step
    calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    loss: torch.Tensor | None = None


class MaskReplay:
    """The attention-mask decision of eager calls, replayed while a stream captures (Note: transformers'
    masks under capture). Hooks act only while `active` (inside the owner's own calls)."""

    def __init__(self, model: torch.nn.Module | None) -> None:
        self.eager_none_mask: dict[torch.nn.Module, bool] = {}
        self.active = False
        self.hooks = [m.register_forward_pre_hook(self._hook, with_kwargs=True)
                      for m in (model.modules() if model is not None else ()) if type(m).__name__.endswith("Attention")]

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        if not self.active or "attention_mask" not in kwargs:
            return None
        if not torch.cuda.is_current_stream_capturing():
            self.eager_none_mask[module] = self.eager_none_mask.get(module, True) and kwargs["attention_mask"] is None
            return None
        if kwargs["attention_mask"] is not None and self.eager_none_mask.get(module, False):
            return args, {**kwargs, "attention_mask": None}
        return None

    @contextmanager
    def watching(self) -> Iterator[None]:
        """The owner's own calls: the hooks record (eager) or replay (capturing) only inside this block."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def remove(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []


def capture_step(step: Callable[[], torch.Tensor], device: torch.device | None = None,
                 pool: Any = None, between: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """(graph, loss): step() (forward + backward, returns the loss) called once eagerly on a new side
    stream, then captured on that same stream, so that the cuBLAS / cuDNN workspaces and lazy state the
    eager call set up serve the graph. between() runs after the eager call. If anything raises, the CUDA
    generator gets its state back (a failed capture leaves it mid-capture) and the error propagates."""
    device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    rng = generator.clone_state()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        if between is not None:
            between()
        with torch.cuda.graph(graph, pool=pool, stream=side):
            loss = step()
    except BaseException:
        generator.graphsafe_set_state(rng)
        raise
    return graph, loss.detach()


def graphs_unsupported(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> str | None:
    """Why train.cuda_graphs cannot run with this model and device, or None when it can."""
    if device.type != "cuda":
        return f"it needs a CUDA device; the run's device is {device}"
    if amp_dtype == torch.float16:
        return "precision fp16 (its loss scaler steps on the host); set train.precision: bf16 or fp32"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "multi-GPU runs (DDP/FSDP2) are not captured; train with one GPU or set train.cuda_graphs: false"
    penalty = getattr(model, "regularization_loss", None)
    if callable(penalty) and penalty() is not None:
        return "the method adds a training penalty and reallocates ranks between steps (AdaLoRA); use LoRA, IA3 or DoRA"
    if loss_head(model) is None:
        return ("the loss must come from hidden states (fast path on, a plain bias-free LM head, a model type "
                "with Architecture.plain_head, no prompt-learning method)")
    return None


def auto_enabled(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, cfg: Any) -> bool:
    """train.cuda_graphs: auto: graphs can run (graphs_unsupported), no checkpoint offload, and the method is
    one whose graph steps were compared with eager ones on a GPU (tests/train/test_cuda_graphs.py): LoRA or
    QLoRA adapters without DoRA."""
    if cfg.offload_checkpoints or graphs_unsupported(model, device, amp_dtype) is not None:
        return False
    configs = getattr(model, "peft_config", None) or {}
    return bool(configs) and all(type(c).__name__ == "LoraConfig" and not getattr(c, "use_dora", False)
                                 for c in configs.values())


class GraphSteps:
    """Forward + backward of the Trainer's micro-batches, replayed as CUDA graphs (see Note: graphs in the SFT loop)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], amp_dtype: torch.dtype | None,
                 bucket: int | None = None, warmup: int | None = None) -> None:
        device = next(p.device for p in params)
        why = graphs_unsupported(model, device, amp_dtype)
        if why is not None:
            raise ValueError(f"train.cuda_graphs: {why}")
        self.model, self.params, self.amp_dtype = model, params, amp_dtype
        self.device, self.bucket = device, bucket or BUCKET
        self.warmup = WARMUP if warmup is None else warmup
        self.head = loss_head(model)
        self.masks = MaskReplay(model)
        self.pool = torch.cuda.graph_pool_handle()
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.grads: list[torch.Tensor] | None = None  # the .grad tensors every graph adds into
        self.reason: str | None = None  # set when a capture failed: every later batch runs eagerly
        self.replays = 0

    @property
    def owns_grads(self) -> bool:
        """True once captured graphs hold the .grad tensors (zero them in place, never set them to None)."""
        return self.grads is not None

    def takes(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether `batch` (collated, on the CPU) can go through a graph."""
        if self.reason is not None or "position_ids" in batch:
            return False
        return batch.get("attention_mask") is None or drop_right_padding_mask(self.model, batch)

    def __call__(self, batch: dict[str, torch.Tensor], n_loss_tokens: int) -> torch.Tensor:
        """Add the gradient of sum(token losses of batch) / n_loss_tokens into .grad; return the sum (detached)."""
        ids, labels = batch["input_ids"], batch["labels"]
        rows, length = ids.shape
        padded = -(-length // self.bucket) * self.bucket
        b = self.buckets.get((rows, padded)) or self._new_bucket(rows, padded)
        b.ids[:, :length].copy_(ids, non_blocking=True)
        b.ids[:, length:].zero_()
        b.labels[:, :length].copy_(labels, non_blocking=True)
        b.labels[:, length:].fill_(IGNORE_INDEX)
        b.inv_n.fill_(1.0 / n_loss_tokens)
        if b.graph is None and b.calls >= self.warmup and self.reason is None:
            self._capture(b)
        b.calls += 1
        if b.graph is None:
            return self._eager(b)
        b.graph.replay()
        self.replays += 1
        return b.loss.clone()  # the shared pool is another graph's scratch space after its next replay

    def _new_bucket(self, rows: int, length: int) -> _Bucket:
        dev = self.device
        b = _Bucket(ids=torch.zeros(rows, length, dtype=torch.long, device=dev),
                    labels=torch.full((rows, length), IGNORE_INDEX, dtype=torch.long, device=dev),
                    positions=torch.arange(length - 1, device=dev), inv_n=torch.ones((), device=dev))
        self.buckets[(rows, length)] = b
        return b

    def _loss_sum(self, b: _Bucket) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return hidden_forward_loss(self.model, self.head, {"input_ids": b.ids}, b.labels, b.positions)[0]

    def _eager(self, b: _Bucket) -> torch.Tensor:
        with self.masks.watching():
            return self._step(b).detach()

    def _step(self, b: _Bucket) -> torch.Tensor:
        loss_sum = self._loss_sum(b)
        (loss_sum * b.inv_n).backward()
        return loss_sum

    def _capture(self, b: _Bucket) -> None:
        if self.grads is None:  # from now on these tensors are the gradients (see Note: graphs in the SFT loop)
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.grads = [p.grad for p in self.params]
        held = [g.clone() for g in self.grads]  # this step's gradient so far
        offset = torch.cuda.get_rng_state(self.device)
        graph: torch.cuda.CUDAGraph | None = None
        try:
            with self.masks.watching():
                graph, b.loss = capture_step(lambda: self._step(b), self.device, self.pool)
        except Exception as e:  # noqa: BLE001 - any capture failure leaves the run eager, with the reason
            self.reason = f"{type(e).__name__}: {e}"[:500]
        if graph is not None and any(p.grad is not g for p, g in zip(self.params, self.grads)):
            self.reason, graph = "the captured backward replaced .grad instead of adding into it", None
            for p, g in zip(self.params, self.grads):
                p.grad = g
        for g, h in zip(self.grads, held):  # take the warm call's gradient back out
            g.copy_(h)
        if graph is not None:  # nor do the warm call and the capture draw random numbers (dropout): resume stays exact
            torch.cuda.set_rng_state(offset, self.device)
        b.graph = graph
