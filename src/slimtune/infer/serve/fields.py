"""Which request fields the completion endpoints honour, and the 400 for every other one.

A field is either honoured or refused: a client that sends `tools` or `logprobs` gets a 400 naming the
field instead of an answer that silently ignores it. A field whose value is the API's neutral value
(`n: 1`, `logprobs: false`, `presence_penalty: 0`, `response_format: {"type": "text"}`, ...) asks
for nothing we do not do and is accepted. A null value is treated as an absent field. Fields that
OpenAI's API does not know at all get OpenAI's own answer, `Unrecognized request argument supplied`.
"""

from __future__ import annotations

from typing import Any

from slimtune.infer.serve.errors import APIError

COMMON = frozenset({"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
                    "stream", "stream_options", "n"})
"""Fields both endpoints honour."""
HONOURED = {True: COMMON | {"messages"}, False: COMMON | {"prompt"}}
"""Honoured fields by endpoint: True is /v1/chat/completions, False is /v1/completions."""

UNSUPPORTED = {
    True: frozenset({"tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logprobs",
                     "top_logprobs", "response_format", "logit_bias", "frequency_penalty", "presence_penalty",
                     "audio", "modalities", "prediction", "reasoning_effort", "store", "metadata", "service_tier",
                     "user", "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier"}),
    False: frozenset({"best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "presence_penalty",
                      "suffix", "user"}),
}
"""Fields of OpenAI's API that this server does not implement, by endpoint."""

NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "logit_bias": ({},),
    "best_of": (1,),
    "echo": (False,),
}
"""Values of unsupported fields that change nothing: the answer is the same as without the field."""


def present_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The body without its null fields (a null means "use the default", as in OpenAI's API)."""
    return {key: value for key, value in body.items() if value is not None}


def check_fields(body: dict[str, Any], chat: bool) -> None:
    """Raise a 400 naming the first field (in body order) that this endpoint does not honour."""
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    for key, value in body.items():
        if key in HONOURED[chat]:
            continue
        if key in UNSUPPORTED[chat]:
            if _is_neutral(key, value):
                continue
            raise APIError(400, f"'{key}' is not supported by this server on {endpoint}; leave it out", key,
                           "unsupported_parameter")
        raise APIError(400, f"Unrecognized request argument supplied: {key}", key, "unrecognized_argument")


def _is_neutral(key: str, value: Any) -> bool:
    for neutral in NEUTRAL.get(key, ()):
        if type(value) is type(neutral) and value == neutral:
            return True
        if isinstance(neutral, int) and not isinstance(neutral, bool) and isinstance(value, float) and value == 0:
            return True
    return False
