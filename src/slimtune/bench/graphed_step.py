"""One fixed-shape training step (forward, loss, backward) captured as a CUDA graph and replayed: the
benchmark's `st-graph` rows. `slimtune train` uses train/cuda_graphs.py (GraphSteps) instead.

    step = GraphedBackward(lambda: loss_of(model, static_batch), params, warmup=2)
    loss = step()          # warmup calls run eagerly; then one capture; then replays
    optimizer.step()
    step.zero_grad(optimizer)

# Note: why a CUDA graph, and what it asks of the step
At batch 1 a QLoRA step of an 8B model launches ~10k kernels (per decoder layer: dequantizations,
LoRA products, norms, rotary, attention, SwiGLU, forward, recompute and backward), most of them short:
the H200 profile (benchmarks/results/profile_8b-qlora-b1_h200_2026-11-29.log) shows 193 ms of kernels
in a 357 ms step, the GPU idle while Python launches. A replayed graph launches them all at once.
The price is the graph's contract:
  * the same shapes and the same code path every call: the inputs are tensors that the caller
    refills in place (`static.copy_(new)`), and nothing in the step syncs with the host (no .item(),
    no data-dependent shapes); packed fixed-length batches satisfy this, padded ones of varying
    length do not;
  * the gradients are the graph's: before the capture every .grad is set to None, so the capture
    allocates them and each replay writes them anew (no accumulation across calls); `zero_grad`
    leaves them in place after the capture (setting them to None would free memory the graph writes);
  * activation memory is the graph's private pool, the size of one eager step's peak.
If the capture fails (an op that cannot be captured), the step stays eager and `reason` says why.
Attention masks under capture: Note: transformers' masks under capture (train/cuda_graphs.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtune.train.cuda_graphs import MaskReplay, capture_step

__all__ = ["GraphedBackward", "graphed_step"]


class GraphedBackward:
    """fn() -> scalar loss; each call returns the loss of fn() after running its backward."""

    def __init__(self, fn: Callable[[], torch.Tensor], params: list[torch.nn.Parameter], warmup: int = 2,
                 model: torch.nn.Module | None = None):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedBackward needs a CUDA device; run the step eagerly on CPU")
        self.fn, self.params, self.warmup = fn, params, max(1, warmup)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.calls = 0
        self.reason: str | None = None  # why the step is eager, once a capture failed
        self.masks = MaskReplay(model)  # Note: transformers' masks under capture

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if self.graph is None and self.reason is None and self.calls > self.warmup:
            with self.masks.watching():
                self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        with self.masks.watching():
            return self._step().detach()

    def remove_hooks(self) -> None:
        """Take the mask hooks off the model (the captured graph keeps working)."""
        self.masks.remove()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear the gradients before the next eager call; after the capture, replays overwrite them."""
        if self.graph is None:
            optimizer.zero_grad(set_to_none=True)

    def _capture(self) -> None:
        try:
            self.graph, self.loss = capture_step(self._step, between=self._clear_grads)
        except Exception as e:  # noqa: BLE001 - any capture failure leaves the step eager, with the reason
            self.reason = f"{type(e).__name__}: {e}"[:500]
            self._clear_grads()

    def _step(self) -> torch.Tensor:
        loss = self.fn()
        loss.backward()
        return loss

    def _clear_grads(self) -> None:  # the capture allocates the gradients that each replay writes anew
        for p in self.params:
            p.grad = None


def graphed_step(model: nn.Module, loss: Callable[[], torch.Tensor],
                 opt: torch.optim.Optimizer) -> tuple[Callable[[], torch.Tensor], GraphedBackward]:
    """(step, graphed): an optimizer step whose forward + backward replay as a CUDA graph."""
    graphed = GraphedBackward(loss, [p for p in model.parameters() if p.requires_grad], model=model)

    def step() -> torch.Tensor:
        value = graphed()
        opt.step()
        graphed.zero_grad(opt)
        return value

    return step, graphed
