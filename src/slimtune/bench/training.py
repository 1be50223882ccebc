"""One training workload timed for one library: build, wrap with LoRA, run warmup + measured steps.

Both sides get the same random model (same seed), LoRA r=16 alpha=16 dropout 0 on all seven
projections, gradient checkpointing (non-reentrant), torch AdamW(lr=1e-4) on the adapter weights and
the same random token batch. slimtune computes its loss with the chunked LM-head cross-entropy
(kernels/cross_entropy.py) from the last hidden state; the baseline calls model(input_ids, labels=...)
as peft users do. The baseline "peft" / "peft+bnb" does not call peft's prepare_model_for_kbit_training:
its fp32 upcast of the norms, embeddings and head would only add memory (see quant/kbit.py, Note: no
upcasting), so it is the stronger baseline. "peft+bnb-kbit" is the QLoRA recipe as the tutorials and the
QLoRA paper's scripts run it: prepare_model_for_kbit_training, then get_peft_model.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from slimtune.bench.graphed_step import graphed_step
from slimtune.bench.models import PRESETS, PROJECTIONS, bnb_quantizer, build_llama, slimtune_quantizer
from slimtune.train.offload import offload_saved_tensors

__all__ = ["KBIT", "Measurement", "Workload", "measure", "peft_loss", "slimtune_loss", "time_steps", "wrap_peft",
           "wrap_slimtune"]


@dataclass(frozen=True)
class Workload:
    """A benchmark case: model shape preset, 4-bit or not, batch size."""

    name: str
    preset: str
    quantized: bool
    batch: int


@dataclass
class Measurement:
    """One row of the table. tokens_per_s counts batch * seq_len tokens per optimizer step (median step)."""

    workload: str
    library: str
    status: str = "ok"  # "ok", "OOM", or "skipped: <why>"
    tokens_per_s: float = 0.0
    step_s: float = 0.0
    peak_gib: float = 0.0  # torch.cuda.max_memory_allocated over the steps (weights included)
    model_gib: float = 0.0  # memory allocated by the model alone, right after it is built
    mfu: float = 0.0
    loss: float = 0.0  # loss of the first step (ln(vocab) ~ 11.76 at random init)
    steps: int = 0
    step_times: list[float] = field(default_factory=list)  # seconds of each timed step; step_s is their median
    note: str = ""  # e.g. why a CUDA-graph row ran eagerly


def _memory(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def wrap_slimtune(model: nn.Module, checkpointing: bool = True) -> nn.Module:
    """slimtune's side: LoRA r=16 alpha=16 on the seven projections, fast path on (as `slimtune train`)."""
    from slimtune import LoraConfig, enable_fast_path, get_peft_model, prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(PROJECTIONS)))
    enable_fast_path(model)  # what `slimtune train` does: fused norms/RoPE/SwiGLU, self-checked
    return model


KBIT = "peft+bnb-kbit"


def wrap_peft(model: nn.Module, quantized: bool, kbit: bool = False, checkpointing: bool = True) -> nn.Module:
    """The baseline: peft's LoRA with the same settings; kbit=True runs the tutorial's kbit preparation first."""
    import peft

    model.is_loaded_in_4bit = quantized  # what transformers sets; peft dispatches bnb layers on it
    if kbit:  # the tutorial recipe: upcasts every bf16 parameter (norms, embeddings, head) to fp32
        peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                             gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=list(PROJECTIONS)))


def slimtune_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of ids (B, T) from the last hidden state (chunked LM-head cross-entropy)."""
    from slimtune.kernels import chunked_linear_cross_entropy

    base = model.get_base_model()
    hidden = base.model(input_ids=ids).last_hidden_state  # (B, T, C)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # position t predicts token t + 1
    total, count = chunked_linear_cross_entropy(h, base.lm_head.weight, ids[:, 1:].reshape(-1))
    return total / count


def peft_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss as peft users compute it: model(input_ids, labels=...)."""
    return model(input_ids=ids, labels=ids).loss


def measure(work: Workload, library: str, device: torch.device, dtype: torch.dtype, seq_len: int,
            warmup: int, steps: int, max_step_seconds: float = 60.0, seed: int = 0,
            offload: bool = False, cuda_graph: bool = False, checkpointing: bool = True) -> Measurement:
    """Build, train and time one (workload, library) pair; frees everything before returning.

    offload=True (slimtune only) runs each forward under offload_saved_tensors(): the checkpointed
    layer inputs wait in pinned host memory (train.offload_checkpoints in a run config).
    cuda_graph=True (slimtune only) replays forward + backward as one CUDA graph after the first warmup
    step (bench/graphed_step.py); the optimizer step stays eager.
    checkpointing=False trains without gradient checkpointing: every layer keeps its activations (no
    recompute), as `slimtune train` does by default (train.gradient_checkpointing: false); for the plain
    baseline too (not with the kbit recipe, which always checkpoints).
    """
    row = Measurement(work.name, library)
    if (offload or cuda_graph) and not library_is_slimtune(row):
        raise ValueError(f"offload and cuda_graph are slimtune's; the baseline {library!r} has no such switch")
    if not checkpointing and library == KBIT:
        raise ValueError(f"the {KBIT} recipe always checkpoints (prepare_model_for_kbit_training)")
    if offload and (cuda_graph or not checkpointing):
        raise ValueError("offload needs checkpointing and does not combine with cuda_graph (host copies inside a graph)")
    try:
        _train(row, work, device, dtype, seq_len, warmup, steps, max_step_seconds, seed, offload, cuda_graph,
               checkpointing)
    except torch.OutOfMemoryError:
        row.status = "OOM"
    gc.collect()
    from slimtune.kernels.dispatch import release_buffers

    release_buffers()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _train(row: Measurement, work: Workload, device: torch.device, dtype: torch.dtype, seq_len: int,
           warmup: int, steps: int, max_step_seconds: float, seed: int, offload: bool,
           cuda_graph: bool = False, checkpointing: bool = True) -> None:
    base_mem = _memory(device)
    quantizer = None
    if work.quantized:
        quantizer = slimtune_quantizer if library_is_slimtune(row) else bnb_quantizer
    model = build_llama(work.preset, device, dtype, quantizer, seed=seed, max_positions=max(seq_len, 64))
    row.model_gib = (_memory(device) - base_mem) / 2**30
    if library_is_slimtune(row):
        model = wrap_slimtune(model, checkpointing)
    else:
        model = wrap_peft(model, work.quantized, row.library == KBIT, checkpointing)
    model.train()
    loss_fn = slimtune_loss if library_is_slimtune(row) else peft_loss
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, PRESETS[work.preset]["vocab_size"], (work.batch, seq_len), generator=gen).to(device)

    saving = offload_saved_tensors if offload else nullcontext

    def step() -> torch.Tensor:
        with saving():
            loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if cuda_graph and device.type == "cuda":
        step, graphed = graphed_step(model, lambda: loss_fn(model, ids), opt)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    row.loss = float(step())
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    n = max(1, min(steps, int(max_step_seconds // max(first, 1e-3)))) if first > 1 else steps
    row.step_times = time_steps(step, n, device)
    row.step_s = statistics.median(row.step_times)
    row.steps = n
    row.tokens_per_s = work.batch * seq_len / row.step_s
    row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if cuda_graph:
        reason = graphed.reason if device.type == "cuda" else "no CUDA"
        row.note = "graph replayed" if reason is None and graphed.captured else f"eager: {reason}"


def time_steps(step: Callable[[], object], n: int, device: torch.device) -> list[float]:
    """Seconds of each of n calls of step(), each timed alone between device syncs (so a median over
    them is robust to one slow step: GC, allocator growth, host jitter)."""
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def library_is_slimtune(row: Measurement) -> bool:
    return not row.library.startswith("peft")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
