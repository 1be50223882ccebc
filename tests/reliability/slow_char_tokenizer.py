"""A slow (pure Python, no offsets) character-level tokenizer with ChatML control tokens, for the code paths
that tokenizers without `return_offsets_mapping` take. Every character is one token (id = code point + 16)."""

from __future__ import annotations

from transformers import PreTrainedTokenizer

SPECIALS = ["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
SHIFT = 16
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class CharTokenizer(PreTrainedTokenizer):
    def __init__(self, **kwargs: object) -> None:
        self._specials = {token: i for i, token in enumerate(SPECIALS)}
        super().__init__(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                         additional_special_tokens=["<|im_start|>", "<|im_end|>"], **kwargs)
        self.chat_template = CHATML

    @property
    def vocab_size(self) -> int:
        return 0x110000 + SHIFT

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(c): c + SHIFT for c in range(128)}
        vocab.update(self._specials)
        return vocab

    def _tokenize(self, text: str, **kwargs: object) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self._specials:
            return self._specials[token]
        return ord(token) + SHIFT if len(token) == 1 else self._specials["<unk>"]

    def _convert_id_to_token(self, index: int) -> str:
        return SPECIALS[index] if index < len(SPECIALS) else chr(index - SHIFT)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)
