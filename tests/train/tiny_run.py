"""Tiny, deterministic fixtures for the training tests: a random Llama, a byte-level tokenizer, rows.

Everything is built from fixed seeds in seconds on CPU; nothing is downloaded. tests/conftest.py builds the
session's tiny model folder (`tiny_model_dir`) from it for the training, CLI and reliability tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

WORDS = [
    ("apple", "a round fruit with red or green skin"), ("river", "a large natural stream of water"),
    ("stone", "a hard solid mineral matter"), ("cloud", "a visible mass of water droplets in the air"),
    ("bread", "food made of flour, water and yeast"), ("chair", "a seat for one person with a back"),
    ("light", "the natural agent that makes things visible"), ("music", "sounds arranged in time"),
    ("paper", "thin material made from wood pulp"), ("ocean", "a very large expanse of sea"),
    ("glass", "a hard brittle transparent substance"), ("honey", "a sweet fluid made by bees"),
]


def build_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer (vocab 320) with ChatML specials, saved to `folder`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [f"What does {w} mean? {d}." for w, d in WORDS] * 3
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=320, min_frequency=1, special_tokens=SPECIAL, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", bos_token=None, unk_token=None)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def build_llama(folder: Path | None, vocab_size: int = 320, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama with hidden size 32, random weights from `seed`; saved to `folder` if given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    if folder is not None:
        model.save_pretrained(folder)
    return model


def write_alpaca(path: Path, n: int, offset: int = 0) -> Path:
    rows = []
    for i in range(n):
        w, d = WORDS[(i + offset) % len(WORDS)]
        rows.append({"instruction": f"What does {w} mean?" + " Explain." * (i % 3), "input": "", "output": d})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_rows(n: int, seed: int = 0, vocab: int = 320) -> list[dict[str, list[int]]]:
    """Tokenized rows of varied lengths (5..17); the first 2 tokens of each are prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + (i * 7) % 13
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return rows


def pad_collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (pad id 0, label -100)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


GOLDEN_METHODS = ("lora", "dora", "qlora", "full")
"""Methods whose 2 epochs x 2 steps losses are pinned in tests/train/golden/<method>.json."""


def golden_config(root: Path, model_dir: Path, method: str) -> Path:
    """The golden run's YAML: 8 alpaca rows, batch 2 x accumulation 2 -> 2 steps per epoch, 2 epochs."""
    import yaml

    train, evals = write_alpaca(root / "train.jsonl", 8), write_alpaca(root / "eval.jsonl", 3, offset=8)
    peft = {} if method == "full" else {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.1}
    raw = {
        "model": str(model_dir), "method": method, "peft": peft,
        "data": {"path": str(train), "eval_path": str(evals)},
        "train": {"epochs": 2, "batch_size": 2, "grad_accum": 2, "lr": 1.0e-2 if method != "full" else 1.0e-3,
                  "max_seq_len": 64, "seed": 0, "log_every": 1, "eval_every": 2, "save_every": 2,
                  "precision": "fp32", "device": "cpu", "report_to": []},
        "output_dir": str(root / f"run-{method}"),
    }
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"loss": [r["loss"] for r in rows if "loss" in r], "lr": [r["lr"] for r in rows if "lr" in r],
            "eval_loss": [r["eval_loss"] for r in rows if "eval_loss" in r]}
