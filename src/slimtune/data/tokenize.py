"""Samples -> token examples `{"input_ids": list[int], "labels": list[int]}` with loss masks.

Labels follow the HF convention: aligned with input_ids (the model shifts them), -100 where no
loss is taken. By default only assistant turns carry loss — every assistant turn of a multi-turn
chat, including its end-of-turn token (<|im_end|>, eos, ...), so the model learns to stop.

# Note: per-turn masks from any chat template
A chat template is a black box that renders a whole conversation. We render it incrementally: for
assistant turn i, P_i = render(turns[:i], add_generation_prompt=True) is the prompt up to the
answer, F_i = render(turns[:i+1]) is the prompt plus the answer. The answer's text is F_i minus P_i,
and we require F_{i-1} to be a prefix of P_i and P_i a prefix of F_i (string prefixes); a template
that rewrites earlier turns (e.g. one that drops past reasoning) fails with a clear error. The full
text is then tokenized once, with offsets, and each token takes the role of the segment its first
character lies in: tokenization is exactly what inference sees (no seams between segments), even
where BPE merges across a boundary. Slow tokenizers (no offsets) encode segment by segment.

Control-token strings inside message content (`<|im_end|>` typed by a user) are tokenized as plain
text unless the caller allows them (data.allow_control_tokens); see the Note in control_tokens.py.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from slimtune.data.control_tokens import ContentGuard, ControlTokenError, Span, encode_literal
from slimtune.data.formats import Sample, Turn
from slimtune.data.templates import ChatTemplate, render

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt, padding, packing boundaries); the one home of this value."""
Example = dict[str, list[int]]


class TemplateError(ValueError):
    """The chat template cannot be split into per-turn segments (not the data's fault)."""


def render_segments(tokenizer, template: ChatTemplate, messages: list[Turn],
                    context_turns: int = 0) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, trained) pieces; see Note above. Assistant turns
    among the first `context_turns` turns are context (not trained), like the prompt's."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, template, messages[: i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise TemplateError(
                f"chat template {template.name!r} does not render turn by turn: the rendering of the first "
                f"{i if not prompt.startswith(done) else i + 1} turns is not a prefix of the longer one, so loss "
                "masks cannot be placed. Loss masks need a template that only appends: rendering more turns (or "
                "add_generation_prompt) never changes what the earlier turns rendered (no rewriting or dropping "
                "of past turns); edit the template so, or use a built-in template (data.template: chatml, alpaca, ...)"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], i >= context_turns)]
        done = full
    whole = render(tokenizer, template, messages)
    if not whole.startswith(done):
        raise TemplateError(f"chat template {template.name!r} renders the whole conversation differently from its turns")
    if len(whole) > len(done):
        pieces.append((whole[len(done) :], False))
    return [(text, trained) for text, trained in pieces if text]


def tokenize_segments(tokenizer, pieces: list[tuple[str, bool]], train_on_prompt: bool,
                      literal_spans: Sequence[Span] = ()) -> Example:
    """Token ids and labels for rendered pieces; special tokens come from the text, none are added.
    Control tokens inside `literal_spans` (character ranges of the joined text) are encoded as text."""
    starts, offset = [], 0
    for piece, _ in pieces:
        starts.append(offset)
        offset += len(piece)
    ids, token_starts = encode_literal(tokenizer, "".join(piece for piece, _ in pieces), literal_spans, starts)
    labels = []
    for token_id, begin in zip(ids, token_starts, strict=True):
        trained = pieces[max(bisect_right(starts, begin) - 1, 0)][1]
        labels.append(token_id if trained or train_on_prompt else IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels}


def tokenize_chat(tokenizer, template: ChatTemplate, messages: list[Turn], train_on_prompt: bool,
                  allow_control_tokens: bool = False, context_turns: int = 0) -> Example:
    """A conversation -> example with loss masks; control tokens in its content stay text unless allowed.
    Assistant turns among the first `context_turns` turns carry no loss (see render_segments)."""
    if allow_control_tokens:
        return tokenize_segments(tokenizer, render_segments(tokenizer, template, messages, context_turns),
                                 train_on_prompt)
    guard = ContentGuard(tokenizer, messages)
    pieces = render_segments(tokenizer, template, guard.messages, context_turns)
    if not guard.found:
        return tokenize_segments(tokenizer, pieces, train_on_prompt)
    texts, spans = guard.restore([text for text, _ in pieces], render(tokenizer, template, messages))
    return tokenize_segments(tokenizer, [(text, trained) for text, (_, trained) in zip(texts, pieces, strict=True)],
                             train_on_prompt, spans)


def tokenize_text(tokenizer, text: str, context_chars: int = 0) -> Example:
    """Plain text: the tokenizer's own special tokens (e.g. bos), eos appended, loss everywhere except
    on the tokens of the first `context_chars` characters (a prompt). The prompt's tokens are the
    longest common prefix of the prompt tokenized alone and the whole text tokenized, as in TRL, so a
    token merging across the boundary is trained."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    labels = list(ids)
    if context_chars:
        prompt_ids = tokenizer(text[:context_chars], add_special_tokens=True)["input_ids"]
        shared = next((k for k, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
        labels[:shared] = [IGNORE_INDEX] * shared
    return {"input_ids": ids, "labels": labels}


def tokenize_sample(sample: Sample, tokenizer, template: ChatTemplate, max_seq_len: int, train_on_prompt: bool = False,
                    allow_control_tokens: bool = False) -> tuple[Example, int]:
    """One sample -> (example truncated to `max_seq_len`, number of tokens cut off)."""
    if sample.text is not None:
        example = tokenize_text(tokenizer, sample.text, 0 if train_on_prompt else sample.context_chars)
    else:
        try:
            example = tokenize_chat(tokenizer, template, sample.messages, train_on_prompt, allow_control_tokens,
                                    sample.context_turns)
        except ControlTokenError as err:
            raise ControlTokenError(f"{sample.where}: {err} (or set data.allow_control_tokens: true)") from None
    dropped = max(len(example["input_ids"]) - max_seq_len, 0)
    if dropped:
        example = {key: values[:max_seq_len] for key, values in example.items()}
    return example, dropped


def loss_tokens(example: Example) -> int:
    """How many labels carry loss."""
    return sum(1 for label in example["labels"] if label != IGNORE_INDEX)
