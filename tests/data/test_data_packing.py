"""Packing keeps samples apart (logits equal to each sample run alone), collation, length grouping."""

from __future__ import annotations

import pytest
import torch

from slimtune.data import IGNORE_INDEX, SFTCollator, block_causal_mask, length_grouped_batches, pack_examples


def _examples(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 100, (n,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_pack_rows_fit_and_keep_every_example():
    examples = _examples([9, 7, 5, 3, 3, 12, 1])
    rows = pack_examples(examples, max_seq_len=12)
    assert all(len(r["input_ids"]) <= 12 for r in rows)
    assert sum(len(r["seq_lens"]) for r in rows) == len(examples)
    assert len(rows) == 4  # 40 tokens in rows of 12: best-fit reaches the minimum
    pieces = []
    for row in rows:
        start = 0
        for n in row["seq_lens"]:
            assert row["position_ids"][start : start + n] == list(range(n))
            pieces.append(tuple(row["input_ids"][start : start + n]))
            start += n
    assert sorted(pieces) == sorted(tuple(e["input_ids"]) for e in examples)
    with pytest.raises(ValueError, match="13 tokens > max_seq_len=12"):
        pack_examples(_examples([13]), 12)


def test_packed_labels_never_cross_samples():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    (row,) = pack_examples(examples, 8)
    # Each sample's first label is masked: after the shift, 7 must not be trained to predict 8.
    assert row["labels"] == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]


def _tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("mode", ["position_ids", "4d_mask"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(attn, mode):
    model = _tiny_llama(attn)
    examples = _examples([6, 9, 4, 11, 7, 3], seed=1)
    rows = pack_examples(examples, max_seq_len=16)
    assert len(rows) < len(examples) and max(len(r["seq_lens"]) for r in rows) > 1
    batch = SFTCollator(pad_token_id=0, packed_attention=mode)(rows)
    assert ("attention_mask" in batch) == (mode == "4d_mask")
    with torch.no_grad():
        # use_cache=False, as in training: transformers infers sample boundaries only without a cache.
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        alone = {tuple(e["input_ids"]): model(torch.tensor([e["input_ids"]])).logits[0] for e in examples}
    checked = 0
    for b, row in enumerate(rows):
        start = 0
        for n in row["seq_lens"]:
            key = tuple(row["input_ids"][start : start + n])
            torch.testing.assert_close(packed[b, start : start + n], alone[key], atol=1e-5, rtol=0)
            start += n
            checked += 1
    assert checked == len(examples)
    # Control: without the restarting positions and mask the logits differ (the test can fail).
    with torch.no_grad():
        leaky = model(batch["input_ids"]).logits
    second = rows[0]["seq_lens"][0]
    assert not torch.allclose(leaky[0, second : second + 2], packed[0, second : second + 2], atol=1e-3)


def test_packed_loss_equals_unpacked_loss():
    model = _tiny_llama("sdpa")
    examples = _examples([6, 9, 4, 11], seed=2)
    packed = SFTCollator(0)(pack_examples(examples, 32))
    plain = SFTCollator(0)(examples)
    with torch.no_grad():
        # Both mean over the same trained targets (token-level mean).
        loss_packed = model(**packed, use_cache=False).loss
        loss_plain = model(**plain, use_cache=False).loss
    torch.testing.assert_close(loss_packed, loss_plain, atol=1e-5, rtol=0)


def test_collator_pads_right_and_masks_labels():
    batch = SFTCollator(pad_token_id=0, pad_to_multiple_of=4)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="packed_attention='flash'"):
        SFTCollator(0, packed_attention="flash")
    with pytest.raises(ValueError, match="pad_token_id must be an int, got None"):
        SFTCollator(None)


def test_block_causal_mask_values():
    mask = block_causal_mask([[2, 1]], width=4, dtype=torch.float32)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # last row: a pad sees itself
    assert mask.shape == (1, 1, 4, 4) and mask.min().item() == torch.finfo(torch.float32).min


def test_length_grouped_batches():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    batches = length_grouped_batches(lengths, batch_size=2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 3 for b in batches)
    assert batches == length_grouped_batches(lengths, batch_size=2, seed=0)
