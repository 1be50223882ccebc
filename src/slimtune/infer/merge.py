"""Merging an adapter into its base and saving a plain transformers model, checked before it is written.

The adapter is folded in with PeftModel.merge_and_unload. A QLoRA base is never re-quantized: adapted
4-bit layers are dequantized and merged in the compute dtype by merge_and_unload, and every other 4-bit
layer is dequantized here, so the saved model is a full-precision model a plain
`AutoModelForCausalLM.from_pretrained` loads (no quantization_config).

# Note: the merge check
Before anything is written we run a few chat prompts through the unmerged model and the merged one
and compare logits. Merging changes only rounding: W x + s B A x versus (W + s B A) x, so the largest
logit difference is about the weights' rounding unit times the logit scale, accumulated over layers.
The default threshold is max(floor, fraction x largest |logit| of the unmerged model) with
(floor, fraction) = (1e-3, 1e-4) in fp32, (0.1, 1e-2) in fp16 and (0.5, 5e-2) in bf16, whose 8-bit
mantissa rounds by up to 4e-3 per operation (a random rank-4 LoRA on a tiny bf16 Llama measures
0.19 against logits of 3.5). A wrong merge (scale, transposition, a dropped layer) moves logits by
a large fraction of their scale.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.dtypes import dtype_name
from slimtune.infer.loading import LoadedModel

DEFAULT_TOLERANCE = {torch.float32: (1e-3, 1e-4), torch.float16: (0.1, 1e-2), torch.bfloat16: (0.5, 5e-2)}
"""(floor, fraction of the largest |logit|) of the default allowed |logit(merged) - logit(unmerged)|,
per compute dtype; see Note: the merge check."""

CHECK_PROMPTS = ("Hello! Who are you?", "Explain what a cat is in one sentence.", "床前明月光，下一句是什么？")
REPORT_FILE = "slimtune_merge.json"


class MergeCheckFailed(ValueError):
    """The merged model's logits differ from the unmerged model's by more than the threshold."""


@dataclass
class MergeReport:
    output: str
    """Folder of the saved model."""
    max_logit_diff: float
    """Largest |logit difference| between merged and unmerged over the check prompts."""
    threshold: float
    """Allowed maximum (absolute)."""
    logit_scale: float
    """Largest |logit| of the unmerged model (the default threshold is a fraction of it)."""
    dtype: str
    """Compute dtype of the merged weights."""
    quantized_base: bool
    """The base was loaded 4-bit (QLoRA) and dequantized."""
    dequantized_layers: int
    """4-bit layers without an adapter that were dequantized for saving."""


def merge_to_dir(model: str, adapter: str | os.PathLike, output: str | os.PathLike, quantization: str = "auto",
                 dtype: str = "auto", device: str | None = None, max_logit_diff: float | None = None) -> MergeReport:
    """Merge `adapter` into `model`, check the logits, save model + tokenizer + generation config."""
    from slimtune.infer.loading import load_for_inference

    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--output {out} exists and is not empty; choose a new folder")
    loaded = load_for_inference(model, {"default": adapter}, quantization, dtype, device)
    peft = loaded.model
    base = peft.get_base_model()
    compute_dtype = _compute_dtype(base)
    if max_logit_diff is not None and not max_logit_diff >= 0:
        raise ValueError(f"--max-logit-diff {max_logit_diff} must be a number >= 0")
    quantized = any(_is_4bit(m) for m in base.modules())
    inputs = check_inputs(loaded.tokenizer, loaded.device)
    before = _logits(peft, inputs)
    scale = max(float(t.abs().max()) for t in before)
    floor, fraction = DEFAULT_TOLERANCE[compute_dtype]
    threshold = max(floor, fraction * scale) if max_logit_diff is None else max_logit_diff
    merged = peft.merge_and_unload()
    dequantized = dequantize_remaining(merged)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, _logits(merged, inputs)))
    report = MergeReport(str(out), diff, threshold, scale, dtype_name(compute_dtype), quantized, dequantized)
    if not diff <= threshold:  # also catches NaN
        raise MergeCheckFailed(
            f"merge check failed: the merged model's logits differ from the unmerged model's by up to {diff:.4g} "
            f"(allowed {threshold:.4g} for {report.dtype}, largest |logit| {scale:.4g}); nothing was written to {out}. The adapter may not "
            "match this base model; pass --max-logit-diff to accept a larger difference")
    _save(merged, loaded, out, report)
    return report


def check_inputs(tokenizer: Any, device: torch.device) -> list[torch.Tensor]:
    """Token ids (1, T) of each check prompt, chat-rendered when the tokenizer has a template."""
    from slimtune.infer.generation import encode, render_chat

    chat = bool(getattr(tokenizer, "chat_template", None))
    texts = [render_chat(tokenizer, [{"role": "user", "content": p}]) if chat else p for p in CHECK_PROMPTS]
    return [torch.tensor([ids], device=device) for ids in encode(tokenizer, texts, chat) if ids]


@torch.no_grad()
def _logits(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids, use_cache=False).logits.float() for ids in inputs]


def dequantize_remaining(model: nn.Module) -> int:
    """Replace every 4-bit layer left (no adapter) by an nn.Linear in its compute dtype; returns how many."""
    names = [name for name, module in model.named_modules() if _is_4bit(module)]
    for name in names:
        module = model.get_submodule(name)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.weight.device, dtype=module.compute_dtype)
        with torch.no_grad():
            plain.weight.copy_(module.dequantize())
            if module.bias is not None:
                plain.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    return len(names)


def _save(model: nn.Module, loaded: LoadedModel, out: Path, report: MergeReport) -> None:
    from transformers import AutoTokenizer

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = _compute_dtype(model)
    model.save_pretrained(tmp, safe_serialization=True)
    # a fresh copy: the loaded one pads on the left for generation
    AutoTokenizer.from_pretrained(loaded.tokenizer_source, trust_remote_code=False).save_pretrained(tmp)
    (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    if out.exists():
        out.rmdir()  # checked empty above
    os.replace(tmp, out)


def _compute_dtype(model: nn.Module) -> torch.dtype:
    for module in model.modules():
        if _is_4bit(module):
            return module.compute_dtype
    return model.get_input_embeddings().weight.dtype


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(module, "dequantize")
