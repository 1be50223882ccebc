"""Getting a tokenizer ready for a template, and saving it with a run so the fine-tuned model chats
with the same template and stops at the end-of-turn token.

`prepare_tokenizer` adds tokens the template needs (e.g. ChatML's <|im_start|>/<|im_end|> on a
tokenizer that lacks them: the caller must then resize the model's embeddings), sets a pad token if
there is none, and stores the template as `tokenizer.chat_template`.
`save_tokenizer_for_run` writes the tokenizer (with that chat template) and a generation_config.json
whose `eos_token_id` lists eos and the end-of-turn token.
"""

from __future__ import annotations

from pathlib import Path

from slimtune.data.templates import ChatTemplate


def prepare_tokenizer(tokenizer, template: ChatTemplate) -> list[str]:
    """Make `tokenizer` render and tokenize `template`; returns the tokens it had to add."""
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in template.special_tokens if tok not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        # Padding is masked by position (attention_mask, labels=-100), so reusing eos is safe here.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else template.eot_token
    tokenizer.chat_template = template.jinja
    return missing


def eot_token_ids(tokenizer, template: ChatTemplate) -> list[int]:
    """Ids generation should stop at: eos and the template's end-of-turn token (deduplicated)."""
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(template.eot_token)]
    unk = tokenizer.unk_token_id
    out: list[int] = []
    for token_id in ids:
        if token_id is not None and token_id != unk and token_id not in out:
            out.append(token_id)
    return out


def save_tokenizer_for_run(tokenizer, template: ChatTemplate, out_dir: str | Path, generation_config=None) -> Path:
    """Save `tokenizer` with `template` as its chat template, plus a GenerationConfig stopping at the
    end-of-turn token. `generation_config` (e.g. the base model's) is updated rather than replaced."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.chat_template = template.jinja
    tokenizer.save_pretrained(out)
    config = GenerationConfig() if generation_config is None else GenerationConfig.from_dict(generation_config.to_dict())
    stop = eot_token_ids(tokenizer, template)
    previous = config.eos_token_id
    previous = [] if previous is None else [previous] if isinstance(previous, int) else list(previous)
    config.eos_token_id = previous + [i for i in stop if i not in previous]
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(out)
    return out
