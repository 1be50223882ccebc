"""Longest trainable context (#7): one QLoRA training step of the Llama-3.1-8B shape at a given length.

Random weights, slimtune NF4 + double quantization, LoRA r16 alpha16 on all seven projections, batch 1,
bf16, one full step of slimtune's own loop (Trainer.train_step: forward + backward + AdamW) with
gradient checkpointing, train.offload_checkpoints (layer inputs in pinned host memory), the loss from
hidden states (chunked LM-head cross-entropy) and the sequence-chunked MLP recompute
(bench/seq_chunk.py). The card is capped at --cap-gib (80: an H100's memory) with
torch.cuda.set_per_process_memory_fraction; SDPA is limited to flash / memory-efficient attention
(O(T) memory: transformers passes is_causal and no mask for an unpadded batch), so a math fallback
fails instead of allocating T x T.

A 350k-token step of all 32 layers costs ~5 min of attention alone (measured on 2 layers with flash /
memory-efficient SDPA: 39.8 s per step, so ~10 min for 32; cuDNN's kernel is now tried first, not yet
timed at this length), so a case may build fewer layers:
the peak of one step is the weights + ONE layer's recompute/backward working set + the loss chunk (the
other layers' inputs wait on the host), so `layers:seq` with 2 layers measures that working set; the
table adds the exact bytes the missing layers would bring (their 4-bit weights + quant state, norms,
LoRA weights + grads + AdamW states, counted from a built layer) as the projected 32-layer peak. A full
32-layer case at a shorter length checks the projection against a real peak.

    python benchmarks/long_context.py                                # 2:65536 32:65536 2:350000
    python benchmarks/long_context.py --cases 2:350000 --mlp-chunk 16384
    python benchmarks/long_context.py --dry-run                      # tiny shape on CPU, checks the script

Expected GPU runtime (one H200, capped at 80 GiB): ~6 min for the default cases (model builds ~1 min,
32:65536 ~1.5 min, 2:350000 ~2-3 min with the host copies of the first pinned allocations).
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import torch
from torch import nn

FULL_LAYERS = 32


@dataclass
class Case:
    layers: int
    seq: int
    status: str = "ok"
    step_s: float = 0.0
    peak_gib: float = 0.0
    extra_gib: float = 0.0  # what the (FULL_LAYERS - layers) missing layers would add
    loss: float = 0.0

    @property
    def projected_gib(self) -> float:
        return self.peak_gib + self.extra_gib


def tensor_bytes(obj: object, seen: set[int]) -> int:
    """Bytes of every distinct tensor in obj (tensors, QuantState-like objects, lists of them)."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.device.type != "meta" else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def layer_bytes(layer: nn.Module) -> int:
    """Device bytes one decoder layer holds during training: weights, quant state, LoRA + grads + AdamW."""
    seen: set[int] = set()
    total = sum(tensor_bytes(t, seen) for t in [*layer.parameters(), *layer.buffers()])
    total += sum(tensor_bytes(m.quant_state, seen) for m in layer.modules() if hasattr(m, "quant_state"))
    trainable = sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
    return total + 3 * trainable  # + grad + AdamW exp_avg + exp_avg_sq, all in the parameters' fp32


def build(preset: str, layers: int, seq: int, device: torch.device, mlp_chunk: int) -> nn.Module:
    """The preset's shape with `layers` decoder layers, 4-bit projections, LoRA r16 on all seven."""
    from slimtune import LoraConfig, enable_fast_path, get_peft_model, prepare_model_for_kbit_training
    from slimtune.bench.models import PRESETS, PROJECTIONS, build_llama, slimtune_quantizer
    from slimtune.bench.seq_chunk import chunk_mlps
    from slimtune.methods.lora.layer import LoraLayer

    name = f"{preset}-{layers}l"
    PRESETS[name] = {**PRESETS[preset], "num_hidden_layers": layers}  # our own table: a shallower copy
    model = build_llama(name, device, torch.bfloat16, slimtune_quantizer, seed=0, max_positions=seq + 1)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.config.use_cache = False
    if mlp_chunk:
        chunk_mlps(model, mlp_chunk)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(PROJECTIONS)))
    for layer in model.modules():  # see bench/training.py (wrap_slimtune): Python 3.12 Protocols
        if isinstance(layer, LoraLayer):
            layer.set_active(["default"], trainable=True)
    enable_fast_path(model)
    return model


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> None:
    from slimtune.train.config import TrainConfig
    from slimtune.train.loop import Trainer

    model = build(args.preset, case.layers, case.seq, device, args.mlp_chunk)
    layer0 = model.get_base_model().model.layers[0]
    case.extra_gib = max(0, FULL_LAYERS - case.layers) * layer_bytes(layer0) / 2**30
    vocab = model.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (1, case.seq), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids[0].tolist(), "labels": ids[0].tolist()}]
    cfg = TrainConfig(batch_size=1, max_steps=1, max_seq_len=case.seq, precision="bf16", lr=1e-4,
                      gradient_checkpointing=True, offload_checkpoints=True, report_to=[], device=str(device))
    trainer = Trainer(model, cfg, rows, None, lambda _: {"input_ids": ids, "labels": ids}, args.out,
                      progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with attention_backends(device):
        metrics = trainer.train_step([{"input_ids": ids, "labels": ids}])
    if device.type == "cuda":
        torch.cuda.synchronize()
        case.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    case.step_s = time.perf_counter() - t0
    case.loss = metrics["loss_sum"] / metrics["loss_tokens"]


def attention_backends(device: torch.device) -> object:
    """On CUDA, SDPA's O(T)-memory kernels only, cuDNN's first (the fastest on Hopper), then flash and
    memory-efficient: never the O(T^2) math fallback. Anything on CPU."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                       set_priority=True)


def main(argv: list[str] | None = None) -> list[Case]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="*", default=["2:65536", "32:65536", "2:350000"], help="layers:seq ...")
    p.add_argument("--cap-gib", type=float, default=80.0)
    p.add_argument("--mlp-chunk", type=int, default=16384, help="positions per MLP recompute chunk; 0: off")
    p.add_argument("--preset", default="8b")
    p.add_argument("--out", default="/tmp/long_context_run")
    p.add_argument("--dry-run", action="store_true", help="tiny preset on CPU, short sequences")
    args = p.parse_args(argv)
    cases = [Case(*map(int, c.split(":"))) for c in args.cases]
    if args.dry_run:
        args.preset, args.mlp_chunk = "tiny", min(args.mlp_chunk, 16) if args.mlp_chunk else 0
        cases = [Case(2, 50), Case(1, 40)]
        from slimtune.kernels import set_fast_path

        set_fast_path("on")  # CPU: take the fused LoRA and chunked-CE paths the GPU run takes
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    from slimtune.kernels.dispatch import release_buffers

    for case in cases:
        try:
            run_case(case, args, device)
        except torch.OutOfMemoryError:
            case.status = "OOM"
        gc.collect()
        release_buffers()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print_row(case, first=case is cases[0], device=device, args=args)
    return cases


def print_row(case: Case, first: bool, device: torch.device, args: argparse.Namespace) -> None:
    if first:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"long context, {args.preset} QLoRA r16, batch 1, bf16, offload + chunked CE + MLP chunk "
              f"{args.mlp_chunk}, cap {args.cap_gib:g} GiB on {name}")
        print(f"{'layers':>6} {'seq':>8} {'status':>6} {'s/step':>8} {'peak GiB':>9} {'+missing GiB':>12} "
              f"{f'proj {FULL_LAYERS}L GiB':>14} {'loss':>7}")
    print(f"{case.layers:6d} {case.seq:8d} {case.status:>6} {case.step_s:8.1f} {case.peak_gib:9.2f} "
          f"{case.extra_gib:12.2f} {case.projected_gib:14.2f} {case.loss:7.3f}", flush=True)


if __name__ == "__main__":
    main()
