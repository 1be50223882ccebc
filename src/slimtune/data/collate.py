"""Batch collation: right padding to the longest example, labels -100 on padding, torch tensors.

Unpacked examples get a 2D `attention_mask` (1 = token, 0 = pad). Packed rows (with `position_ids`)
get one of two attention layouts, chosen by `packed_attention`:
  position_ids  no attention_mask; position_ids restart at 0 for each sample (pads: 0 each, so
                every pad is its own one-token sample). transformers finds the sample boundaries from
                them and builds the block-diagonal causal mask (sdpa/eager/flex), and flash-attention
                turns them into cu_seq_lens. The forward must run with use_cache=False (as training
                does): with a KV cache, transformers skips this detection and samples would see
                each other.
  4d_mask       an explicit additive mask (B, 1, T, T): 0 where query t may see key s (same sample,
                s <= t), the dtype's min elsewhere. transformers passes 4D masks through unchanged.
                Its dtype must match the model's for sdpa (`mask_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.data.tokenize import IGNORE_INDEX


@dataclass
class SFTCollator:
    """Pads a list of examples into a batch dict of tensors (B, T)."""

    pad_token_id: int
    """Id written in padded input_ids positions (never attended to, never trained)."""
    packed_attention: str = "position_ids"
    """For packed rows: position_ids | 4d_mask (see module docstring)."""
    mask_dtype: torch.dtype = torch.float32
    """dtype of the 4D additive mask; use the model's compute dtype (bf16 for a bf16 model)."""
    pad_to_multiple_of: int | None = None
    """Round the padded length up to a multiple of this (tensor-core friendly), or None."""

    def __post_init__(self) -> None:
        if self.packed_attention not in ("position_ids", "4d_mask"):
            raise ValueError(f"packed_attention={self.packed_attention!r}; allowed: position_ids, 4d_mask")
        if not isinstance(self.pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int, got {self.pad_token_id!r}; set tokenizer.pad_token")

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        width = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad([ex["input_ids"] for ex in examples], width, self.pad_token_id),
            "labels": _pad([ex["labels"] for ex in examples], width, IGNORE_INDEX),
        }
        if "position_ids" not in examples[0]:
            batch["attention_mask"] = _pad([[1] * len(ex["input_ids"]) for ex in examples], width, 0)
            return batch
        batch["position_ids"] = _pad([ex["position_ids"] for ex in examples], width, 0)
        if self.packed_attention == "4d_mask":
            batch["attention_mask"] = block_causal_mask([ex["seq_lens"] for ex in examples], width, self.mask_dtype)
        return batch


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def block_causal_mask(seq_lens: list[list[int]], width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask (B, 1, T, T): 0 where query t sees key s (same sample, s <= t), dtype-min elsewhere.
    Padding positions form one-token samples, so no softmax row is empty."""
    sample_id = torch.empty(len(seq_lens), width, dtype=torch.long)
    for b, lens in enumerate(seq_lens):
        ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))
        pads = width - ids.numel()
        sample_id[b] = torch.cat([ids, torch.arange(len(lens), len(lens) + pads)])
    same = sample_id[:, :, None] == sample_id[:, None, :]  # (B, T, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (same & causal)[:, None]  # (B, 1, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
