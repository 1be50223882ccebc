"""One training micro-step (forward, loss, backward) captured as a CUDA graph and replayed.

    step = GraphedBackward(lambda: loss_of(model, static_batch), warmup=2)
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

# Note: transformers' masks under capture
transformers lets SDPA run its causal kernel (is_causal=True, no mask tensor) only after host-side
checks (no padding, no packed sequences in position_ids), and while a CUDA stream is capturing it skips
them and builds a dense (B, 1, T, T) mask instead. Captured that way, the H200's cuDNN attention ran 3x
slower (1B LoRA b4: 1.37 against 0.48 ms per backward call, ~26 ms per step). Telling transformers
that nothing is capturing does not work: its checks then sync with the host and the capture fails.
So GraphedBackward(model=...) watches the attention modules (class name ending in "Attention") in the
eager warmup calls, on the same static inputs: a module that got attention_mask=None there gets None
again during the capture, in place of the dense mask, and computes what it computed eagerly. This is
only right while every batch is like the warmup's: a batch with padding (an attention mask with zeros)
must not go through a graph captured on one without. Packed rows (position_ids restarting per sample)
must not be captured at all: transformers skips its packed-sequence detection under capture and would
build a plain causal mask, attending across samples. `slimtune train` replays its steps through
train/graph_steps.py (Note: graphs in the SFT loop there): length buckets with one graph each, right
padding left unmasked, packed rows refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["GraphedBackward", "MaskReplay", "capture_step"]


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
