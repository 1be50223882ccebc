"""Shared fixtures for slimtune.data tests: a tiny byte-level BPE tokenizer built offline."""

from __future__ import annotations

import pytest

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "### Instruction:\nWhat does the word cat mean?\n\n### Response:\nA small domesticated feline.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "user assistant system You are helpful. Hello there! How are you? I am fine, thank you.",
    "[INST] <<SYS>> <</SYS>> [/INST] [Round 1] 问：答：床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "The quick brown fox jumps over the lazy dog. Use the word in a sentence. Input: context",
] * 4
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def bpe_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def _wrap(bpe_json: str, chat_template: str | None, add_bos: bool):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(bpe_json)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture
def plain_tok(bpe_json):
    """No chat template, no automatic bos: built-in templates apply (auto -> alpaca)."""
    return _wrap(bpe_json, None, add_bos=False)


@pytest.fixture
def bos_tok(bpe_json):
    """Llama-like: the tokenizer prepends <s> itself."""
    return _wrap(bpe_json, None, add_bos=True)


@pytest.fixture
def chatml_tok(bpe_json):
    """A tokenizer with its own ChatML chat template (like SmolLM2 / Qwen)."""
    return _wrap(bpe_json, CHATML_JINJA, add_bos=False)


@pytest.fixture
def bos_chatml_tok(bpe_json):
    """Its own ChatML chat template, and it prepends <s> to plain text itself."""
    return _wrap(bpe_json, CHATML_JINJA, add_bos=True)
