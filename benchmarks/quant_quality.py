"""Quality of 4-bit data types at small scale (the QLoRA paper's Table 2, on SmolLM2-135M-Instruct).

Every linear weight except the output head is quantized and dequantized back, block size 64, and
the perplexity of the model is measured on held-out real text: the WordNet evaluation rows
(English) and the Tang poems evaluation rows (Chinese) that ship with slimtune. Data types:
bf16 (reference), NF4, NF4 + double quantization, FP4, and a plain symmetric int4 (absmax / 7).

    python benchmarks/quant_quality.py [--out docs/quantization.md]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from importlib import resources

import torch
from torch import nn

from slimtune import default_model_path
from slimtune.quant import dequantize_4bit, quantize_4bit


def int4_symmetric(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Round-to-nearest int4 in [-7, 7] per block of `blocksize` weights, scaled by the block absmax."""
    flat = weight.float().flatten()
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7
    deq = (torch.round(blocks / scale).clamp(-7, 7) * scale).flatten()[: flat.numel()]
    return deq.view_as(weight).to(weight.dtype)


def quantizer(kind: str):
    if kind == "int4":
        return int4_symmetric
    quant_type, double = {"nf4": ("nf4", False), "nf4+dq": ("nf4", True), "fp4": ("fp4", False)}[kind]
    return lambda w: dequantize_4bit(*quantize_4bit(w, quant_type=quant_type, blocksize=64, double_quant=double))


def held_out_texts() -> dict[str, list[str]]:
    root = resources.files("slimtune.assets")
    out = {}
    for name, folder in (("English (WordNet)", "wordnet_instruct"), ("Chinese (Tang poems)", "tang300_zh")):
        rows = [json.loads(line) for line in root.joinpath(folder).joinpath("eval.jsonl").read_text().splitlines()]
        out[name] = [f"{r['instruction']} {r.get('input', '')} {r['output']}".strip() for r in rows]
    return out


def gaussian_error_table() -> str:
    """Relative squared error of each data type on N(0, 1) weights (what NF4 is designed for)."""
    torch.manual_seed(0)
    weight = torch.randn(2048, 2048)
    lines = ["| data type | relative MSE on N(0,1) weights |", "|---|---|"]
    for kind in ("nf4", "nf4+dq", "fp4", "int4"):
        error = (quantizer(kind)(weight) - weight).pow(2).mean() / weight.pow(2).mean()
        lines.append(f"| {kind} | {error.item():.5f} |")
    return "\n".join(lines)


@torch.no_grad()
def perplexity(model: nn.Module, tok, texts: list[str], batch: int = 16) -> float:
    total, count = 0.0, 0
    for start in range(0, len(texts), batch):
        enc = tok(texts[start:start + batch], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        logits = model(**enc).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((target != -100).sum())
    return math.exp(total / count)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    args = parser.parse_args()
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    texts = held_out_texts()
    rows = []
    for kind in ("bf16", "nf4", "nf4+dq", "fp4", "int4"):
        start = time.time()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        if kind != "bf16":
            head = model.get_output_embeddings()
            fn = quantizer(kind)
            for module in model.modules():
                if isinstance(module, nn.Linear) and module is not head:
                    module.weight.data = fn(module.weight.data)
        model = model.float()
        ppl = {name: perplexity(model, tok, t) for name, t in texts.items()}
        rows.append((kind, ppl))
        print(kind, {k: round(v, 3) for k, v in ppl.items()}, f"{time.time() - start:.0f}s", flush=True)
    names = list(texts)
    lines = ["| data type | " + " | ".join(f"perplexity, {n}" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {kind} | " + " | ".join(f"{ppl[n]:.3f}" for n in names) + " |" for kind, ppl in rows]
    table = "\n".join(lines) + "\n\n" + gaussian_error_table()
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
