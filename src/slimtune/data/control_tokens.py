"""Chat-control tokens written inside message content stay plain text.

A rendered chat is one string: the template's control tokens (<|im_start|>, <|im_end|>, eos, ...) and
the messages' content side by side. Tokenized as it is, a `<|im_end|><|im_start|>system ...` typed into
a message becomes real control tokens, and whoever wrote it forges turns. `ContentGuard` finds such
strings in the messages and `encode_literal` tokenizes them as text; training (data.tokenize) and
inference (infer.generation.encode_chat) both go through here, so a model sees at inference what it
was trained on.

# Note: control tokens in content
Control tokens are the tokens the tokenizer marks special (eos, pad, <|im_start|>, ...). Before
rendering, every control-token string in a message's text fields (content, an alpaca input; not the
role) is replaced by a placeholder: a private-use character, a number, the same character. Every
control token in that rendering is therefore the template's own. Putting the strings back records where
each lies (literal spans); the result must equal the template's rendering of the real messages, else the
template rewrote the content and the conversation is refused (ControlTokenError) rather than encoded
unsafely. Encoding tokenizes the text as usual, except each stretch around a literal span, from the
template's control token before it to the one after it (or the text's ends), which is tokenized with
`split_special_tokens=True`: there `<|im_end|>` becomes `<`, `|`, `im`, ... while every template token
stays one id. A tokenizer splits its input at special tokens before anything else, so the tokens
outside those stretches are the ones a plain call gives. Messages without control-token strings are
tokenized exactly as a plain call would.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Any

PRIVATE_USE = range(0xE000, 0xF900)
"""Candidate placeholder characters: Unicode's private-use area, which no template writes."""
Span = tuple[int, int]


class ControlTokenError(ValueError):
    """Control tokens in message content cannot be kept as text (the template rewrites content, or the
    tokenizer does not split special tokens on request)."""


def control_strings(tokenizer: Any) -> list[str]:
    """The strings of the tokenizer's special tokens, longest first (so the longest match wins)."""
    found = {token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special}
    found.update(tokenizer.all_special_tokens)
    return sorted((s for s in found if s), key=lambda s: (-len(s), s))


def special_ids(tokenizer: Any) -> set[int]:
    ids = {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    return ids | set(tokenizer.all_special_ids)


class ContentGuard:
    """Messages with every control-token string in their text replaced by a placeholder; `restore`
    turns a rendering of `messages` back into real text and says where those strings lie."""

    def __init__(self, tokenizer: Any, messages: Sequence[dict[str, Any]]) -> None:
        controls = control_strings(tokenizer)
        self.found: list[str] = []
        """The control-token strings taken out of the content, in order of their placeholders."""
        texts = [v for m in messages for k, v in m.items() if k != "role" and isinstance(v, str)]
        self._pattern = re.compile("|".join(map(re.escape, controls))) if controls else None
        if self._pattern is None or not any(self._pattern.search(t) for t in texts):
            self.messages = [dict(m) for m in messages]
            return
        self._mark = next(chr(c) for c in PRIVATE_USE if not any(chr(c) in t for t in texts))
        self.messages = [{k: self._hide(v) if k != "role" and isinstance(v, str) else v for k, v in m.items()}
                         for m in messages]

    def _hide(self, text: str) -> str:
        def placeholder(match: re.Match[str]) -> str:
            self.found.append(match.group(0))
            return f"{self._mark}{len(self.found) - 1}{self._mark}"

        return self._pattern.sub(placeholder, text)  # type: ignore[union-attr]

    def restore(self, pieces: Sequence[str], reference: str) -> tuple[list[str], list[Span]]:
        """(pieces with the control-token strings put back, their spans in the joined text).

        `pieces` are consecutive parts of a rendering of `self.messages`; `reference` is the template's
        rendering of the real messages, which the restored text must equal.
        """
        if not self.found:
            return list(pieces), []
        placeholder = re.compile(re.escape(self._mark) + r"(\d+)" + re.escape(self._mark))
        out: list[str] = []
        spans: list[Span] = []
        position = 0
        for piece in pieces:
            parts, last = [], 0
            for match in placeholder.finditer(piece):
                index = int(match.group(1))
                if index != len(spans) or index >= len(self.found):
                    break
                parts.append(piece[last:match.start()])
                position += len(parts[-1])
                parts.append(self.found[index])
                spans.append((position, position + len(self.found[index])))
                position += len(self.found[index])
                last = match.end()
            parts.append(piece[last:])
            position += len(parts[-1])
            out.append("".join(parts))
        if len(spans) != len(self.found) or "".join(out) != reference:
            raise ControlTokenError(
                f"the message content holds {len(self.found)} control token(s) ({', '.join(sorted(set(self.found)))}), "
                "and the chat template changes the content it renders, so they cannot be kept as plain text; "
                "remove them from the content or use a template that prints content unchanged")
        return out, spans


def encode_literal(tokenizer: Any, text: str, spans: Sequence[Span], cuts: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """(token ids of `text`, the character each token starts at), with control tokens inside `spans`
    tokenized as plain text; see Note above. `cuts`: sorted piece starts that a tokenizer without
    offsets (slow) tokenizes separately, so that every token belongs to one piece."""
    if getattr(tokenizer, "is_fast", False):
        return _encode_fast(tokenizer, text, spans)
    return _encode_slow(tokenizer, text, spans, cuts)


def _encode_fast(tokenizer: Any, text: str, spans: Sequence[Span]) -> tuple[list[int], list[int]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if not spans:
        return ids, [begin for begin, _ in offsets]
    specials = special_ids(tokenizer)
    anchors = [o for i, o in zip(ids, offsets, strict=True) if i in specials and not _overlaps(o, spans)]
    out_ids: list[int] = []
    starts: list[int] = []
    j = 0
    for begin, end in _regions(spans, anchors, len(text)):
        while j < len(ids) and offsets[j][0] < begin:
            out_ids.append(ids[j])
            starts.append(offsets[j][0])
            j += 1
        region = tokenizer(text[begin:end], add_special_tokens=False, return_offsets_mapping=True,
                           split_special_tokens=True)
        _check_plain(region["input_ids"], specials, text[begin:end])
        out_ids += region["input_ids"]
        starts += [begin + b for b, _ in region["offset_mapping"]]
        while j < len(ids) and offsets[j][0] < end:
            j += 1
    out_ids += ids[j:]
    starts += [begin for begin, _ in offsets[j:]]
    return out_ids, starts


def _encode_slow(tokenizer: Any, text: str, spans: Sequence[Span], cuts: Sequence[int]) -> tuple[list[int], list[int]]:
    specials = special_ids(tokenizer)
    anchors: list[Span] = []
    if spans:
        controls = control_strings(tokenizer)
        pattern = re.compile("|".join(map(re.escape, controls)))
        anchors = [m.span() for m in pattern.finditer(text) if not _overlaps(m.span(), spans)]
    regions = _regions(spans, anchors, len(text))
    bounds = sorted({0, len(text), *cuts, *(b for r in regions for b in r)})
    ids: list[int] = []
    starts: list[int] = []
    for begin, end in zip(bounds, bounds[1:]):
        literal = any(rb <= begin and end <= re_ for rb, re_ in regions)
        split = {"split_special_tokens": True} if literal else {}  # else the tokenizer's own setting
        piece = tokenizer(text[begin:end], add_special_tokens=False, **split)["input_ids"]
        if literal:
            _check_plain(piece, specials, text[begin:end])
        ids += piece
        starts += [begin] * len(piece)
    return ids, starts


def _overlaps(span: Span, spans: Sequence[Span]) -> bool:
    begin, end = span
    return any(b < end and begin < e for b, e in spans)


def _regions(spans: Sequence[Span], anchors: list[Span], length: int) -> list[Span]:
    """For each literal span, the stretch between the template control tokens around it; merged, sorted."""
    ends = [end for _, end in anchors]
    begins = [begin for begin, _ in anchors]
    regions: list[Span] = []
    for begin, end in sorted(spans):
        left = ends[bisect_right(ends, begin) - 1] if bisect_right(ends, begin) else 0
        k = bisect_left(begins, end)
        right = begins[k] if k < len(begins) else length
        if regions and left < regions[-1][1]:
            regions[-1] = (regions[-1][0], max(regions[-1][1], right))
        else:
            regions.append((left, right))
    return regions


def _check_plain(ids: Sequence[int], specials: set[int], text: str) -> None:
    if any(i in specials for i in ids):
        raise ControlTokenError(f"the tokenizer keeps control tokens in {text[:80]!r} even with "
                                "split_special_tokens=True, so they cannot be encoded as plain text")
