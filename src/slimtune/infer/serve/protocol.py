"""The OpenAI wire format: request validation and response/chunk bodies.

Every field is honoured or refused with a 400 naming it (see slimtune.infer.serve.fields); null fields
count as absent. Errors use OpenAI's shape:
{"error": {"message", "type", "param", "code"}} with the HTTP status in APIError.status.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from slimtune.infer.generation import SamplingOptions
from slimtune.infer.serve.errors import APIError
from slimtune.infer.serve.fields import check_fields, present_fields

__all__ = ["ParsedRequest", "parse_request"]

ROLES = ("system", "user", "assistant")
MAX_STOP = 4
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
"""A seed is a signed 64-bit integer, as in OpenAI's API."""


@dataclass
class ParsedRequest:
    """A validated request: which model, the prompt (chat messages or text), and how to sample."""

    model: str
    chat: bool
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    options: SamplingOptions = field(default_factory=SamplingOptions)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    """Streaming only: a last chunk with empty choices carries the usage (stream_options.include_usage)."""


def parse_request(body: Any, chat: bool, default_max_tokens: int, max_tokens_limit: int) -> ParsedRequest:
    """Validate a /v1/chat/completions (chat) or /v1/completions body."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    body = present_fields(body)
    check_fields(body, chat)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required: the base model's name or an adapter's (see GET /v1/models)",
                       "model")
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, f"n={_short(n)} is not supported; only n=1", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {_short(stream)}", "stream")
    request = ParsedRequest(model, chat, options=_options(body, default_max_tokens, max_tokens_limit),
                            stop=_stop(body.get("stop")), stream=stream,
                            include_usage=_include_usage(body.get("stream_options"), stream))
    if chat:
        request.messages = _messages(body.get("messages"))
    else:
        request.prompt = _prompt(body.get("prompt"))
    return request


def _options(body: dict[str, Any], default_max_tokens: int, limit: int) -> SamplingOptions:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= limit:
        raise APIError(400, f"'{key}' must be an integer in [1, {limit}], got {_short(max_tokens)}", key)
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not _is_number(temperature) or not 0.0 <= temperature <= 2.0:
        raise APIError(400, f"'temperature' must be a number in [0, 2], got {_short(temperature)}", "temperature")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise APIError(400, f"'top_p' must be a number in (0, 1], got {_short(top_p)}", "top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX):
        raise APIError(400, f"'seed' must be an integer in [{SEED_MIN}, {SEED_MAX}], got {_short(seed)}", "seed")
    return SamplingOptions(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed)


def _include_usage(value: Any, stream: bool) -> bool:
    """stream_options: {"include_usage": bool}, allowed only with stream: true (as in OpenAI's API)."""
    if value is None:
        return False
    if not stream:
        raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       "stream_options")
    if not isinstance(value, dict):
        raise APIError(400, f"'stream_options' must be an object, got {_short(value)}", "stream_options")
    for key, option in value.items():
        if key != "include_usage":
            raise APIError(400, f"Unrecognized request argument supplied: stream_options.{key}",
                           f"stream_options.{key}", "unrecognized_argument")
        if option is not None and not isinstance(option, bool):
            raise APIError(400, f"'stream_options.include_usage' must be a boolean, got {_short(option)}",
                           "stream_options.include_usage")
    return value.get("include_usage") is True


def _short(value: Any) -> str:
    """repr of a value for an error message, cut so that a huge integer does not flood it."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return stops


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] must be an object with role one of {', '.join(ROLES)}",
                           f"messages[{i}].role")
        out.append({"role": message["role"], "content": _content(message.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    """A string, or OpenAI's list of parts of which only text parts are accepted."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value:
        raise APIError(400, "'prompt' must be a non-empty string (or a list holding one)", "prompt")
    return value


# ---- responses -------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def completion_body(rid: str, model: str, chat: bool, text: str, finish: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage_body(prompt_tokens, completion_tokens)}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_chunk_body(rid: str, model: str, chat: bool, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with include_usage: no choices, the request's usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_body(prompt_tokens, completion_tokens)}


def chunk_body(rid: str, model: str, chat: bool, text: str | None, finish: str | None,
               first: bool = False, include_usage: bool = False) -> dict[str, Any]:
    """One streamed chunk; with include_usage it carries "usage": null, as OpenAI's do."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return body


def model_body(name: str, base: str) -> dict[str, Any]:
    """OpenAI's model object; an adapter's parent is the base model."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "slimtune",
            "parent": None if name == base else base}


def models_body(names: list[str], base: str) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(n, base) for n in names]}
