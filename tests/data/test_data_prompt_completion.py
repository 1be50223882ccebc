"""TRL's prompt-completion rows (standard: two strings; conversational: two lists of turns): detected,
converted, and tokenized with the loss on the completion only, checked against TRL's own SFT data
processing (SFTTrainer's tokenized train_dataset) for the same rows and tokenizer."""

from __future__ import annotations

import csv
import json

import pytest

from slimtune.data import (
    IGNORE_INDEX,
    DataConfig,
    RowError,
    build_datasets,
    load_samples,
    resolve_template,
    tokenize_sample,
)
from slimtune.data.inspect import marked_spans

CONVERSATIONAL = [
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
    {"prompt": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello there!"},
                {"role": "assistant", "content": "How are you?"}, {"role": "user", "content": "I am fine."}],
     "completion": [{"role": "assistant", "content": "Thank you."}]},
]
STANDARD = [
    {"prompt": "The quick brown", "completion": " fox jumps over the lazy dog."},
    {"prompt": "床前明月光，", "completion": "疑是地上霜。"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_table(path, rows):
    """rows as .json, .parquet or .csv (lists as JSON strings in CSV cells, as pandas writes them)."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
            writer.writeheader()
            for row in rows:
                writer.writerow({k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in row.items()})
    return path


def trl_examples(tokenizer, rows, tmp_path) -> list[dict[str, list[int]]]:
    """TRL's SFTTrainer data processing of `rows`: input_ids and labels (-100 off the completion)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=None,
                     dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in trainer.train_dataset]


def slimtune_examples(tokenizer, path) -> list[dict[str, list[int]]]:
    samples, fmt = load_samples(str(path), DataConfig(path=str(path)))
    assert fmt == "prompt_completion"
    template = resolve_template("auto", tokenizer)
    return [tokenize_sample(s, tokenizer, template, 4096)[0] for s in samples]


@pytest.mark.parametrize("rows", [CONVERSATIONAL, STANDARD], ids=["conversational", "standard"])
@pytest.mark.parametrize("tok_name", ["chatml_tok", "bos_chatml_tok"])
def test_tokens_and_loss_mask_equal_trl(tmp_path, request, rows, tok_name):
    tokenizer = request.getfixturevalue(tok_name)
    ours = slimtune_examples(tokenizer, write_jsonl(tmp_path / "rows.jsonl", rows))
    theirs = trl_examples(tokenizer, rows, tmp_path)
    assert ours == theirs
    assert all(IGNORE_INDEX in ex["labels"] and ex["labels"][-1] != IGNORE_INDEX for ex in ours)


def test_prompt_assistant_turns_are_context_and_system_prompt_keeps_them(tmp_path, chatml_tok):
    path = write_jsonl(tmp_path / "rows.jsonl", CONVERSATIONAL[1:])
    cfg = DataConfig(path=str(path), eval_split=0, system_prompt="ignored: the row has its own")
    data = build_datasets(cfg, chatml_tok, max_seq_len=512, seed=0)
    trained = [text for text, on in marked_spans(data.train[0], chatml_tok) if on]
    assert trained == ["Thank you.<|im_end|>\n"]  # "How are you?" in the prompt is not trained
    # train_on_prompt trains everything, as for every other format
    everything = build_datasets(DataConfig(path=str(path), eval_split=0, train_on_prompt=True), chatml_tok, 512, 0)
    assert IGNORE_INDEX not in everything.train[0]["labels"]
    # a system prompt added in front shifts the context by one turn: still only the completion is trained
    no_system = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": CONVERSATIONAL[1]["prompt"][1:],
                                                        "completion": CONVERSATIONAL[1]["completion"]}])
    data = build_datasets(DataConfig(path=str(no_system), eval_split=0, system_prompt="Be brief."), chatml_tok, 512, 0)
    spans = marked_spans(data.train[0], chatml_tok)
    assert [t for t, on in spans if on] == ["Thank you.<|im_end|>\n"] and "Be brief." in spans[0][0]


def test_standard_form_is_text_with_prompt_as_context(tmp_path):
    samples, fmt = load_samples(str(write_jsonl(tmp_path / "r.jsonl", STANDARD)), DataConfig())
    assert fmt == "prompt_completion"
    assert [(s.text, s.context_chars, s.messages) for s in samples] == [
        ("The quick brown fox jumps over the lazy dog.", 15, []), ("床前明月光，疑是地上霜。", 6, [])]


@pytest.mark.parametrize("kind", ["csv", "parquet", "json"])
def test_every_file_type_and_explicit_format(tmp_path, kind):
    for rows in (CONVERSATIONAL, STANDARD):
        path = write_table(tmp_path / f"rows.{kind}", rows)
        auto, fmt = load_samples(str(path), DataConfig(path=str(path)))
        explicit, used = load_samples(str(path), DataConfig(path=str(path), format="prompt_completion"))
        assert fmt == used == "prompt_completion" and auto == explicit and len(auto) == 2
    assert explicit[0].context_turns == 0 and auto[1].context_chars == len("床前明月光，")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q"}, "line 1, field 'completion': is missing; this format needs 'prompt' and 'completion'"),
        ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]},
         "field 'completion': is a list of turns but 'prompt' is a string"),
        ({"prompt": [{"role": "user", "content": "q"}], "completion": "a"},
         "field 'completion': is not a list of turns but 'prompt' is"),
        ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
         "field 'completion': holds no assistant turn"),
        ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant"}]},
         "field 'completion[0]': expected an object with 'role' and 'content'"),
        ({"prompt": "q", "completion": " "}, "field 'completion': is empty"),
    ],
)
def test_row_errors_name_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(RowError) as info:
        load_samples(str(path), DataConfig(path=str(path), format="prompt_completion"))
    assert str(info.value).startswith(f"{path} line 1, field ") and message in str(info.value)


def test_detection_names_the_new_form_when_nothing_matches():
    from slimtune.data import detect_format

    assert detect_format([("f line 1", STANDARD[0])]) == "prompt_completion"
    with pytest.raises(ValueError, match=r"'prompt'\+'completion' \(prompt_completion\)"):
        detect_format([("f line 1", {"question": "q"})])
