"""Packing examples into rows of at most `max_seq_len` tokens, and length-grouped batches.

A packed row concatenates whole examples (never split) and carries `position_ids` restarting at 0
for each example, plus `seq_lens`. The model must not attend across examples: the collator turns
position_ids / seq_lens into what attention needs (see collate.py). The first label of each example
is set to -100: after the model's shift, the last token of one example would otherwise be trained
to predict the first token of the next one. Unpacked, that label is never used, so a packed row
trains on exactly the same targets as its examples run alone.

Rows are filled best-fit-decreasing (longest example first into the fullest row it still fits),
which wastes few pad tokens and is deterministic for a given example order.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort

from slimtune.data.tokenize import IGNORE_INDEX, Example


def pack_examples(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Pack examples (each <= max_seq_len tokens) into rows with input_ids, labels, position_ids, seq_lens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: best fit = first with room >= n
    for index in order:
        size = len(examples[index]["input_ids"])
        if size > max_seq_len:
            raise ValueError(f"example {index} has {size} tokens > max_seq_len={max_seq_len}; truncate before packing")
        slot = bisect_left(free, (size, -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = max_seq_len, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - size > 0:
            insort(free, (room - size, row))
    return [_concat([examples[i] for i in members]) for members in rows]


def _concat(parts: list[Example]) -> Example:
    row: Example = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for part in parts:
        size = len(part["input_ids"])
        row["input_ids"] += part["input_ids"]
        row["labels"] += [IGNORE_INDEX] + part["labels"][1:]
        row["position_ids"] += list(range(size))
        row["seq_lens"].append(size)
    return row


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, mega_batch: int = 50) -> list[list[int]]:
    """Index batches of similar lengths: shuffle, cut into mega-batches of `mega_batch * batch_size`,
    sort each by length (longest first), split into batches, then shuffle the batch order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    span = mega_batch * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(indices), span):
        group = sorted(indices[start : start + span], key=lambda i: -lengths[i])
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches
