"""data.template as the path of a .jinja chat template file: rendered through apply_chat_template, loss
on assistant turns only (HF's {% generation %} assistant mask as the oracle, for a template whose blocks
hold each assistant turn's whole rendering, as slimtune's masks do), saved with the run's tokenizer;
templates that rewrite earlier turns, missing and broken files are refused naming the file."""

from __future__ import annotations

import json

import pytest

from slimtune.data import (
    IGNORE_INDEX,
    DataConfig,
    Sample,
    TemplateError,
    build_datasets,
    resolve_template,
    save_tokenizer_for_run,
    tokenize_sample,
)
from slimtune.data.inspect import marked_spans

GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '### Response:\\n' }}"
    "{% generation %}{{ message['content'] + eos_token + '\\n' }}{% endgeneration %}"
    "{% else %}{{ '### ' + message['role'] + ':\\n' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
PLAIN = GENERATION.replace("{% generation %}", "").replace("{% endgeneration %}", "")
CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "How are you?"},
    {"role": "user", "content": "I am fine."},
    {"role": "assistant", "content": "Thank you."},
]


def template_file(tmp_path, text, name="chat.jinja"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("text", [GENERATION, PLAIN], ids=["generation-blocks", "plain"])
def test_mask_equals_hf_assistant_mask(tmp_path, plain_tok, text):
    path = template_file(tmp_path, text)
    template = resolve_template(path, plain_tok)
    assert template.name == path and template.eot_token == "</s>" and template.jinja == text
    example, _ = tokenize_sample(Sample("t", CHAT), plain_tok, template, 1024)
    hf = plain_tok.apply_chat_template(CHAT, chat_template=GENERATION, tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
    assert example["input_ids"] == list(hf["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in example["labels"]] == list(hf["assistant_masks"])
    assert [t for t, on in marked_spans(example, plain_tok) if on] == ["How are you?</s>\n", "Thank you.</s>\n"]


def test_pipeline_uses_it_and_run_tokenizer_keeps_it(tmp_path, plain_tok):
    path = template_file(tmp_path, PLAIN)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": CHAT[1:3]}) + "\n", encoding="utf-8")
    data = build_datasets(DataConfig(path=str(rows), template=path, eval_split=0), plain_tok, 256, 0)
    assert data.stats.template == path and data.added_tokens == []
    assert [t for t, on in marked_spans(data.train[0], plain_tok) if on] == ["How are you?</s>\n"]
    saved = save_tokenizer_for_run(plain_tok, data.template, tmp_path / "tok")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(saved).chat_template == PLAIN


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path, plain_tok):
    # drops every assistant answer but the last one, as some reasoning templates do
    dropping = ("{% for message in messages %}{% if message['role'] != 'assistant' or loop.last %}"
                "{{ message['role'] + ': ' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    path = template_file(tmp_path, dropping)
    template = resolve_template(path, plain_tok)
    with pytest.raises(TemplateError, match=rf"chat template '{path}' does not render turn by turn.*only appends"):
        tokenize_sample(Sample("t", CHAT), plain_tok, template, 1024)


def test_missing_and_broken_files_name_the_file(tmp_path, plain_tok):
    with pytest.raises(ValueError, match=r"data.template='nope.jinja': chat template file not found"):
        DataConfig(template="nope.jinja")
    with pytest.raises(ValueError, match=r"or the path of a Jinja chat template file ending in .jinja"):
        DataConfig(template="chat.txt")
    broken = template_file(tmp_path, "{% for message in messages %}{{ message['content'] }", "broken.jinja")
    with pytest.raises(ValueError, match=rf"{broken}: not a usable Jinja chat template \(TemplateSyntaxError"):
        resolve_template(broken, plain_tok)
    empty = template_file(tmp_path, "  \n", "empty.jinja")
    with pytest.raises(ValueError, match=rf"{empty}: the chat template file is empty"):
        resolve_template(empty, plain_tok)
