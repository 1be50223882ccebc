"""A first real check: LoRA on SmolLM2-135M-Instruct over real WordNet rows lowers held-out loss."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

import slimtune

transformers = pytest.importorskip("transformers")


def _rows(name: str, n: int) -> list[dict]:
    text = resources.files("slimtune.assets").joinpath("wordnet_instruct").joinpath(name).read_text()
    return [json.loads(line) for line in text.splitlines()[:n]]


def _encode(tok, row: dict, max_len: int = 64) -> tuple[list[int], list[int]]:
    """ChatML prompt + answer; loss on the answer and its end-of-turn token only."""
    prompt = tok.apply_chat_template([{"role": "user", "content": row["instruction"]}], tokenize=False,
                                     add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(row["output"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_len]
    return ids, labels


def _batches(tok, rows: list[dict], size: int):
    for start in range(0, len(rows), size):
        pairs = [_encode(tok, r) for r in rows[start:start + size]]
        width = max(len(ids) for ids, _ in pairs)
        ids = torch.full((len(pairs), width), tok.pad_token_id)
        labels = torch.full((len(pairs), width), -100)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (x, y) in enumerate(pairs):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _held_out_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(**b).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_lora_on_smollm2_lowers_held_out_loss(tmp_path):
    from slimtune.models import default_model_path

    path = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = slimtune.get_peft_model(base, slimtune.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                             task_type="CAUSAL_LM"))
    train = list(_batches(tok, _rows("train.jsonl", 192), 16))
    held_out = list(_batches(tok, _rows("eval.jsonl", 32), 16))
    before = _held_out_loss(model, held_out)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for batch in train:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = _held_out_loss(model, held_out)
    assert after < before - 0.3, (before, after)

    model.save_pretrained(tmp_path)
    reloaded = slimtune.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tmp_path)
    assert abs(_held_out_loss(reloaded, held_out) - after) < 1e-4
