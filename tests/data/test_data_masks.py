"""Templates and loss masks: golden renderings, every assistant turn trained with its end-of-turn
token, prompts masked, HF's own assistant mask as an oracle, truncation counts, saved tokenizer."""

from __future__ import annotations

import json

import pytest

from slimtune.data import (
    IGNORE_INDEX,
    DataConfig,
    Sample,
    TemplateError,
    build_datasets,
    prepare_tokenizer,
    render,
    resolve_template,
    save_tokenizer_for_run,
    tokenize_sample,
)
from slimtune.data.inspect import marked_spans
from slimtune.data.loading import ASSETS_DIR


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


CHAT = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "床前明月光"},
    {"role": "assistant", "content": "疑是地上霜。"},
]


def _tokenize(tok, template_name, messages=CHAT, train_on_prompt=False, max_len=512):
    template = resolve_template(template_name, tok)
    prepare_tokenizer(tok, template)
    example, dropped = tokenize_sample(Sample("t", messages), tok, template, max_len, train_on_prompt)
    return template, example, dropped


def _trained(example, tok) -> list[str]:
    return [text for text, on in marked_spans(example, tok) if on]


def test_own_chatml_template_masks_every_assistant_turn(chatml_tok):
    template, example, _ = _tokenize(chatml_tok, "auto")
    assert template.name == "tokenizer" and template.eot_token == "<|im_end|>"
    assert _trained(example, chatml_tok) == ["Hello!<|im_end|>\n", "疑是地上霜。<|im_end|>\n"]
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    ids, labels = example["input_ids"], example["labels"]
    assert ids.count(im_end) == 5  # system, user, assistant, user, assistant
    assert [lab for lab in labels if lab == im_end] == [im_end, im_end]  # only the assistants' are trained
    text = render(chatml_tok, template, CHAT)
    assert ids == chatml_tok(text, add_special_tokens=False)["input_ids"]  # same ids as inference would see
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))


def test_mask_matches_hf_generation_mask(chatml_tok):
    """Oracle: a ChatML template with {% generation %} blocks, rendered by transformers itself."""
    generation_jinja = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    chatml_tok.chat_template = generation_jinja
    _, example, _ = _tokenize(chatml_tok, "tokenizer")
    hf = chatml_tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert example["input_ids"] == list(hf["input_ids"])
    assert [int(lab != IGNORE_INDEX) for lab in example["labels"]] == list(hf["assistant_masks"])
    assert sum(hf["assistant_masks"]) > 10


def test_builtin_alpaca_golden_and_masks(plain_tok):
    messages = [{"role": "user", "content": "Translate", "input": "chat"}, {"role": "assistant", "content": "cat"}]
    template, example, _ = _tokenize(plain_tok, "auto", messages)
    assert template.name == "alpaca" and template.eot_token == "</s>"
    assert render(plain_tok, template, messages) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate\n\n### Input:\nchat\n\n### Response:\ncat</s>"
    )
    assert _trained(example, plain_tok) == ["cat</s>"]
    _, multi, _ = _tokenize(plain_tok, "alpaca")
    assert _trained(multi, plain_tok) == ["Hello!</s>", "疑是地上霜。</s>"]
    assert render(plain_tok, template, CHAT).startswith("Be nice.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>")
    assert "\n\n### Instruction:\n床前明月光\n\n### Response:\n疑是地上霜。</s>" in render(plain_tok, template, CHAT)


def test_alpaca_prepends_bos_when_the_tokenizer_does(bos_tok):
    _, example, _ = _tokenize(bos_tok, "alpaca")
    assert example["input_ids"][0] == bos_tok.bos_token_id and example["labels"][0] == IGNORE_INDEX
    assert example["input_ids"].count(bos_tok.bos_token_id) == 1


def test_builtin_chatml_llama2_chatglm_goldens(plain_tok, bos_tok):
    one = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
           {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    chatml = resolve_template("chatml", plain_tok)
    assert render(plain_tok, chatml, one[:2], add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )
    llama2 = resolve_template("llama2", bos_tok)
    assert render(bos_tok, llama2, one) == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nQ [/INST] A </s><s>[INST] Q2 [/INST] A2 </s>"
    chatglm = resolve_template("chatglm", plain_tok)
    assert render(plain_tok, chatglm, one) == "S\n\n[Round 1]\n\n问：Q\n\n答：A</s>\n\n[Round 2]\n\n问：Q2\n\n答：A2</s>"
    for name, tok, expected in [("chatml", plain_tok, ["A<|im_end|>\n", "A2<|im_end|>\n"]),
                                ("llama2", bos_tok, [" A </s>", " A2 </s>"]), ("chatglm", plain_tok, ["A</s>", "A2</s>"])]:
        _, example, _ = _tokenize(tok, name, one)
        assert _trained(example, tok) == expected, name


def test_train_on_prompt_trains_everything(chatml_tok):
    _, example, _ = _tokenize(chatml_tok, "auto", train_on_prompt=True)
    assert example["labels"] == example["input_ids"]


def test_template_that_rewrites_history_fails_clearly(chatml_tok):
    chatml_tok.chat_template = "{{ messages[-1]['role'] }}: {{ messages[-1]['content'] }}"
    with pytest.raises(TemplateError, match="does not render turn by turn.*use a built-in template"):
        _tokenize(chatml_tok, "tokenizer")


def test_truncation_is_counted_and_fully_cut_answers_dropped(tmp_path, chatml_tok):
    long_answer = " ".join(["word"] * 60)
    rows = [
        {"instruction": "Hi", "output": "Hello!"},
        {"instruction": "Say many words", "output": long_answer},
        {"instruction": " ".join(["long"] * 80), "output": "cut"},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    full = build_datasets(DataConfig(path=str(path), eval_split=0, shuffle=False), chatml_tok, 4096, seed=0)
    lengths = [len(ex["input_ids"]) for ex in full.train]
    limit = lengths[0] + 5
    cut = build_datasets(DataConfig(path=str(path), eval_split=0, shuffle=False), chatml_tok, limit, seed=0)
    stats = cut.stats
    assert stats.truncated_rows == 2
    assert stats.truncated_tokens == (lengths[1] - limit) + (lengths[2] - limit)
    assert stats.dropped_no_loss == 1  # the third row's answer is entirely past the limit
    assert stats.train_examples == 2 and [len(ex["input_ids"]) for ex in cut.train] == [lengths[0], limit]
    assert cut.train[1]["input_ids"] == full.train[1]["input_ids"][:limit]


def test_chinese_poems_through_the_pipeline(chatml_tok):
    data = build_datasets(DataConfig(path="slimtune:tang300_zh", max_rows=12), chatml_tok, 512, seed=3)
    lines = (ASSETS_DIR / "tang300_zh" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:12]]
    answers = {row["output"] + "<|im_end|>\n" for row in rows}
    trained = {_trained(ex, chatml_tok)[0] for ex in data.train}
    assert trained <= answers and len(trained) == len(data.train) == 12
    assert data.stats.eval_examples == 30  # the shipped eval.jsonl


def test_save_tokenizer_for_run_carries_template_and_stop_tokens(tmp_path, plain_tok):
    from transformers import AutoTokenizer, GenerationConfig

    from slimtune.data.tokenizer_setup import eot_token_ids

    template = resolve_template("chatml", plain_tok)
    assert prepare_tokenizer(plain_tok, template) == []  # the test vocab has the ChatML tokens
    out = save_tokenizer_for_run(plain_tok, template, tmp_path / "run", GenerationConfig(eos_token_id=7, do_sample=True))
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.chat_template == template.jinja
    generation = GenerationConfig.from_pretrained(out)
    im_end, eos = plain_tok.convert_tokens_to_ids("<|im_end|>"), plain_tok.eos_token_id
    assert generation.eos_token_id == [7, eos, im_end] and generation.do_sample is True
    assert eot_token_ids(plain_tok, template) == [eos, im_end]
    text = loaded.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_on_a_tokenizer_without_its_tokens_adds_them(bpe_json):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(["hello world"], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    size = len(tok)
    template = resolve_template("chatml", tok)
    assert prepare_tokenizer(tok, template) == ["<|im_start|>", "<|im_end|>"]
    assert len(tok) == size + 2 and tok.pad_token == "</s>"
    _, example, _ = _tokenize(tok, "chatml", CHAT[1:3])
    assert example["labels"][-2] == tok.convert_tokens_to_ids("<|im_end|>")


def test_plain_text_trains_every_token_with_eos(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox."}])
    data = build_datasets(DataConfig(path=str(path), eval_split=0), plain_tok, 64, seed=0)
    (example,) = data.train
    assert example["labels"] == example["input_ids"] and example["input_ids"][-1] == plain_tok.eos_token_id
    assert plain_tok.decode(example["input_ids"]) == "The quick brown fox.</s>"
    assert data.stats.loss_fraction == 1.0


def test_template_name_checks(plain_tok):
    with pytest.raises(ValueError, match="data.template='tokenizer' but the tokenizer has no chat_template"):
        resolve_template("tokenizer", plain_tok)
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        resolve_template("vicuna", plain_tok)
