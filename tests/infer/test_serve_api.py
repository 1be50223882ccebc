"""The server's API contract beyond plain completions, on a live server (127.0.0.1, ephemeral port):
every request field is honoured or refused with a 400 naming it; null fields count as absent;
stream_options.include_usage ends a stream with a usage chunk; GET /v1/models/{id}."""

from __future__ import annotations

import json
import urllib.request

import pytest
from test_serve import call, chat_body

from slimtune.infer.serve import ServeConfig, Server
from slimtune.infer.serve.errors import APIError
from slimtune.infer.serve.fields import HONOURED, UNSUPPORTED, check_fields


@pytest.fixture(scope="module")
def server(loaded):
    srv = Server(loaded, ServeConfig(port=0)).start()
    yield srv
    srv.close()


def _error(answer: dict) -> dict:
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error"
    return answer["error"]


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("parallel_tool_calls", True), ("logprobs", True), ("top_logprobs", 2),
    ("response_format", {"type": "json_object"}), ("logit_bias", {"50256": -100}), ("presence_penalty", 0.5),
    ("frequency_penalty", 1), ("audio", {"voice": "alloy"}), ("modalities", ["text"]),
    ("prediction", {"type": "content", "content": "x"}), ("user", "u-1"),
])
def test_unsupported_chat_fields_are_refused_by_name(server, field, value):
    status, answer = call(server, "/v1/chat/completions", chat_body("alpha", "hi", 2, **{field: value}))
    error = _error(answer)
    assert status == 400 and error["param"] == field and error["code"] == "unsupported_parameter"
    assert field in error["message"]


@pytest.mark.parametrize("field, value", [("logprobs", 1), ("echo", True), ("best_of", 2), ("suffix", "x"),
                                          ("messages", [{"role": "user", "content": "hi"}])])
def test_unsupported_completion_fields_are_refused_by_name(server, field, value):
    body = {"model": "alpha", "prompt": "Hello", "max_tokens": 2, field: value}
    status, answer = call(server, "/v1/completions", body)
    assert status == 400 and _error(answer)["param"] == field


def test_unknown_fields_get_openais_unrecognized_argument(server):
    status, answer = call(server, "/v1/chat/completions", chat_body("alpha", "hi", 2, temprature=0.5))
    error = _error(answer)
    assert status == 400 and error["param"] == "temprature"
    assert error["message"] == "Unrecognized request argument supplied: temprature"
    status, answer = call(server, "/v1/chat/completions", chat_body("alpha", "hi", 2, prompt="x"))
    assert status == 400 and _error(answer)["param"] == "prompt"


def test_null_and_neutral_values_are_accepted(server):
    body = chat_body("alpha", "Hello there!", 3, tools=None, logprobs=False, stream=None, n=1, seed=None,
                     response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0.0,
                     tool_choice="none", user=None, stop=None, whatever=None)
    status, answer = call(server, "/v1/chat/completions", body)
    plain = call(server, "/v1/chat/completions", chat_body("alpha", "Hello there!", 3))[1]
    assert status == 200, answer
    assert answer["choices"][0]["message"] == plain["choices"][0]["message"]


def test_every_honoured_field_is_read_by_the_parser():
    """The honoured list is what parse_request validates: a bad value of each is a 400 naming it."""
    from slimtune.infer.serve.protocol import parse_request

    bad = {"model": 3, "messages": "x", "prompt": 3, "max_tokens": 0, "max_completion_tokens": 0,
           "temperature": 9, "top_p": 0, "stop": 3, "seed": "x", "stream": "x", "n": 2,
           "stream_options": {"include_usage": True}}
    for chat in (True, False):
        assert HONOURED[chat].isdisjoint(UNSUPPORTED[chat])
        for field in HONOURED[chat]:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}] if chat else None,
                    "prompt": None if chat else "hi", field: bad[field]}
            with pytest.raises(APIError) as info:
                parse_request(body, chat, 4, 8)
            assert info.value.param == field, (chat, field)
    check_fields({"model": "m", "messages": []}, True)


def _stream(server, path, body):
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        events = [line.decode()[len("data: "):].rstrip("\n") for line in resp if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", chat_body("beta", "Hello there!", 6)),
    ("/v1/completions", {"model": "beta", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}),
])
def test_include_usage_ends_the_stream_with_a_usage_chunk(server, path, body):
    plain = call(server, path, body)[1]
    chunks = _stream(server, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"] == plain["usage"]
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    without = _stream(server, path, {**body, "stream": True, "stream_options": {"include_usage": False}})
    assert all("usage" not in c and len(c["choices"]) == 1 for c in without)


@pytest.mark.parametrize("extra, param", [
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ({"stream": True, "stream_options": [1]}, "stream_options"),
])
def test_bad_stream_options_are_a_400(server, extra, param):
    status, answer = call(server, "/v1/chat/completions", chat_body("alpha", "hi", 2, **extra))
    assert status == 400 and _error(answer)["param"] == param


def test_get_one_model(server):
    for name in ("tiny-base", "alpha", "beta"):
        status, body = call(server, f"/v1/models/{name}")
        assert status == 200 and body == next(m for m in call(server, "/v1/models")[1]["data"] if m["id"] == name)
    for name in ("gamma", "..%2Falpha", "alpha/x", ""):
        status, answer = call(server, f"/v1/models/{name}")
        error = _error(answer)
        assert status == 404 and error["code"] == "model_not_found" and error["param"] == "model"


def test_get_one_model_needs_the_key_like_the_list(loaded):
    key = "model-key-123456"
    srv = Server(loaded, ServeConfig(port=0, api_key=key)).start()
    try:
        for path in ("/v1/models", "/v1/models/alpha", "/v1/models/gamma"):
            status, answer = call(srv, path)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key"
            assert call(srv, path, key="wrong-key-000")[0] == 401
        assert call(srv, "/v1/models/alpha", key=key)[0] == 200
        assert call(srv, "/v1/models/gamma", key=key)[0] == 404
    finally:
        srv.close()
