"""Row formats -> one canonical form, and format detection.

Canonical form (a `Sample`): `messages`, a list of turns `{"role": "system"|"user"|"assistant",
"content": str}`, or, for plain-text rows, `text` (trained on every token, no template). A user turn
made from an alpaca/Belle row with a non-empty `input` also carries `"input": str` so the alpaca
template can print its "### Input:" section; every other template sees `content + "\\n\\n" + input`
(see `templates.merge_inputs`).

Formats (keys of one row):
  alpaca    instruction, output; optional input, system, history [[query, answer], ...]
  belle     instruction, output, optional input (BelleGroup train_0.5M/1M/2M_CN). Multi-turn
            (BelleGroup multiturn_chat_0.8M): instruction holds "Human: ...\\nAssistant: ...\\n
            Human: ...\\nAssistant:" and output the last answer; rows with `conversations` (train_3.5M_CN)
            are read like ShareGPT.
  sharegpt  conversations: [{from: human|gpt|system, value}], optional top-level system
  messages  messages: [{role: system|user|assistant, content}] (OpenAI chat style)
  prompt_completion
            prompt, completion (TRL's prompt-completion type). Standard: two strings; the sample is
            the text prompt + completion, trained on the completion only (eos appended). Conversational:
            two lists of {role, content} turns; the sample is the conversation prompt + completion, and
            only the completion's assistant turns are trained (assistant turns in the prompt are context).
  text      text
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from slimtune.data.validation import RowError, check_text, validate_conversation

Turn = dict[str, str]


@dataclass(frozen=True)
class Sample:
    """One usable row: where it came from, and either a conversation or a plain text."""

    where: str
    messages: list[Turn] = field(default_factory=list)
    text: str | None = None
    context_turns: int = 0
    """The first `context_turns` turns of `messages` are context: their assistant turns carry no loss."""
    context_chars: int = 0
    """The first `context_chars` characters of `text` are context (a prompt): they carry no loss."""


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}
"""ShareGPT `from` values we accept and the canonical role each maps to."""

_BELLE_MARK = re.compile(r"(?:^|\n)\s*(Human|Assistant)\s*[:：]")


def _opt_text(row: dict, key: str, where: str) -> str:
    """An optional string field: missing/None/NaN (CSV, Parquet) read as ""."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return check_text(value, where, key, allow_empty=True)


def _list_field(row: dict, key: str, where: str, required: bool) -> list:
    """A list field; CSV cells hold it as a JSON string, which is decoded here."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value) or value == "":
        if required:
            raise RowError(where, key, f"is missing; a list is required (row keys: {sorted(row)})")
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(where, key, f"a string that is not a JSON list ({exc.msg})") from None
    if hasattr(value, "tolist"):  # numpy arrays from pandas-backed readers
        value = value.tolist()
    if not isinstance(value, list):
        raise RowError(where, key, f"expected a list, got {type(value).__name__}")
    return value


def _require(row: dict, key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise RowError(where, key, f"is missing; this format needs it (row keys: {sorted(row)})")
    return check_text(row[key], where, key)


def _user_turn(instruction: str, extra_input: str) -> Turn:
    turn = {"role": "user", "content": instruction}
    if extra_input.strip():
        turn["input"] = extra_input
    return turn


def from_alpaca(row: dict, where: str) -> Sample:
    instruction = _require(row, "instruction", where)
    output = _require(row, "output", where)
    messages: list[Turn] = []
    system = _opt_text(row, "system", where)
    if system.strip():
        messages.append({"role": "system", "content": system})
    for i, pair in enumerate(_list_field(row, "history", where, required=False)):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError(where, f"history[{i}]", f"expected a [query, answer] pair, got {pair!r:.60}")
        messages.append({"role": "user", "content": check_text(pair[0], where, f"history[{i}][0]")})
        messages.append({"role": "assistant", "content": check_text(pair[1], where, f"history[{i}][1]")})
    messages.append(_user_turn(instruction, _opt_text(row, "input", where)))
    messages.append({"role": "assistant", "content": output})
    return Sample(where, messages)


def _belle_dialogue(instruction: str, where: str) -> list[Turn]:
    """Split Belle's "Human: ...\\nAssistant: ..." history into turns (the last Assistant is empty)."""
    marks = list(_BELLE_MARK.finditer(instruction))
    if instruction[: marks[0].start()].strip():
        raise RowError(where, "instruction", "text before the first 'Human:' marker in a multi-turn Belle row")
    turns: list[Turn] = []
    for k, mark in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(instruction)
        role = "user" if mark.group(1) == "Human" else "assistant"
        turns.append({"role": role, "content": instruction[mark.end() : end].strip()})
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    if turns[-1]["role"] != "user":
        raise RowError(where, "instruction", "a multi-turn Belle instruction must end with 'Human: ...' (then 'Assistant:')")
    return turns


def from_belle(row: dict, where: str) -> Sample:
    if "conversations" in row and "instruction" not in row:
        return from_sharegpt(row, where)
    instruction = _require(row, "instruction", where)
    output = _require(row, "output", where)
    if not _BELLE_MARK.match(instruction):
        return Sample(where, [_user_turn(instruction, _opt_text(row, "input", where)), {"role": "assistant", "content": output}])
    messages = _belle_dialogue(instruction, where)
    last = messages[-1]
    messages[-1] = _user_turn(last["content"], _opt_text(row, "input", where))
    messages.append({"role": "assistant", "content": output})
    return Sample(where, messages)


def from_sharegpt(row: dict, where: str) -> Sample:
    turns = _list_field(row, "conversations", where, required=True)
    messages: list[Turn] = []
    system = _opt_text(row, "system", where)
    if system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        name = f"conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(where, name, f"expected an object with 'from' and 'value', got {turn!r:.60}")
        source = turn["from"]
        if not isinstance(source, str) or source not in SHAREGPT_ROLES:
            raise RowError(where, f"{name}.from", f"unknown speaker {source!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[source], "content": check_text(turn["value"], where, f"{name}.value")})
    return Sample(where, messages)


def _role_content_turns(turns: list, key: str, where: str) -> list[Turn]:
    """`[{role, content}, ...]` of field `key` as canonical turns (roles are checked later)."""
    messages: list[Turn] = []
    for i, turn in enumerate(turns):
        name = f"{key}[{i}]"
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RowError(where, name, f"expected an object with 'role' and 'content', got {turn!r:.60}")
        messages.append({"role": turn["role"], "content": check_text(turn["content"], where, f"{name}.content")})
    return messages


def from_messages(row: dict, where: str) -> Sample:
    return Sample(where, _role_content_turns(_list_field(row, "messages", where, required=True), "messages", where))


def _is_conversational(value: object) -> bool:
    """A list of turns, or (as CSV cells hold lists) a string that is a JSON list of objects."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return False
    return isinstance(value, list) and all(isinstance(turn, dict) for turn in value)


def from_prompt_completion(row: dict, where: str) -> Sample:
    for key in ("prompt", "completion"):
        if row.get(key) is None:
            raise RowError(where, key, f"is missing; this format needs 'prompt' and 'completion' (row keys: {sorted(row)})")
    if not _is_conversational(row["prompt"]):
        prompt = check_text(row["prompt"], where, "prompt", allow_empty=True)
        if _is_conversational(row["completion"]):
            raise RowError(where, "completion", "is a list of turns but 'prompt' is a string; both are strings "
                                                "(standard form) or both lists of {role, content} (conversational)")
        completion = check_text(row["completion"], where, "completion")
        return Sample(where, text=prompt + completion, context_chars=len(prompt))
    prompt_turns = _role_content_turns(_list_field(row, "prompt", where, required=True), "prompt", where)
    if not _is_conversational(row["completion"]):
        raise RowError(where, "completion", "is not a list of turns but 'prompt' is; both are strings (standard "
                                            "form) or both lists of {role, content} (conversational)")
    completion_turns = _role_content_turns(_list_field(row, "completion", where, required=True), "completion", where)
    if not any(turn["role"] == "assistant" for turn in completion_turns):
        raise RowError(where, "completion", "holds no assistant turn; the completion is what the model is trained "
                                            "to say, e.g. [{\"role\": \"assistant\", \"content\": \"...\"}]")
    return Sample(where, prompt_turns + completion_turns, context_turns=len(prompt_turns))


def from_text(row: dict, where: str) -> Sample:
    return Sample(where, text=_require(row, "text", where))


CONVERTERS: dict[str, Callable[[dict, str], Sample]] = {
    "alpaca": from_alpaca,
    "belle": from_belle,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "prompt_completion": from_prompt_completion,
    "text": from_text,
}
"""Format name -> row converter. Adding a format is adding a function and a line here."""


def to_sample(row: object, fmt: str, where: str) -> Sample:
    """Convert and validate one raw row; raises RowError naming `where` and the field."""
    if not isinstance(row, dict):
        raise RowError(where, "<row>", f"expected a JSON object / table row, got {type(row).__name__}")
    sample = CONVERTERS[fmt](row, where)
    if sample.text is None:
        validate_conversation(sample.messages, where)
    return sample


def row_format(row: dict) -> str | None:
    """The format one row's keys point to, or None."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        instruction = row["instruction"]
        return "belle" if isinstance(instruction, str) and _BELLE_MARK.match(instruction) else "alpaca"
    if "text" in row:
        return "text"
    return None


def detect_format(rows: list[tuple[str, dict]]) -> str:
    """Detect the format from the first rows (where, row). Belle single-turn rows read as alpaca;
    a mix of alpaca and Belle multi-turn rows is Belle (it reads both)."""
    if not rows:
        raise ValueError("cannot detect the data format: no readable rows")
    found: dict[str, str] = {}
    for where, row in rows:
        fmt = row_format(row) if isinstance(row, dict) else None
        if fmt is None:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{where}: cannot detect the data format from keys {keys}; expected 'messages' (messages), "
                "'conversations' (sharegpt), 'prompt'+'completion' (prompt_completion), "
                "'instruction'+'output' (alpaca/belle) or 'text' (text); "
                "or set data.format explicitly"
            )
        found.setdefault(fmt, where)
    kinds = set(found)
    if kinds == {"alpaca", "belle"}:
        return "belle"
    if len(kinds) > 1:
        detail = ", ".join(f"{fmt} at {where}" for fmt, where in found.items())
        raise ValueError(f"rows of different formats in one dataset ({detail}); use one format per file")
    return kinds.pop()
