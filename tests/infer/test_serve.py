"""The OpenAI-compatible server against a live ThreadingHTTPServer on 127.0.0.1 (ephemeral port), with a
real HTTP client (urllib): batching across concurrent requests is token-identical to single greedy
generation, streaming, auth, unknown model, malformed JSON, oversized body, overload, stop strings."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from tiny_chat import cli_app
from typer.testing import CliRunner

from slimtune.infer import SamplingOptions, generate
from slimtune.infer.generation import render_chat
from slimtune.infer.serve import ServeConfig, Server

KEY = "test-key-123456"


def call(server, path, body=None, key=None, raw=None, method=None):
    """(status, parsed JSON or raw text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def chat_body(model, content, max_tokens=6, **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def greedy(loaded, content, adapter, max_tokens=6):
    prompt = render_chat(loaded.tokenizer, [{"role": "user", "content": content}])
    return generate(loaded, [prompt], SamplingOptions(max_new_tokens=max_tokens), adapter=adapter)[0]


@pytest.fixture(scope="module")
def server(loaded):
    srv = Server(loaded, ServeConfig(port=0, batch_wait_ms=300, max_batch_size=4)).start()
    yield srv
    srv.close()


def test_models_lists_base_and_adapters(server):
    status, body = call(server, "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny-base", "alpha", "beta"]
    assert body["data"][1]["parent"] == "tiny-base"


def test_concurrent_requests_batched_per_adapter_equal_single_greedy(server, loaded):
    cases = [(model, text, limit) for model in ("alpha", "beta", "tiny-base")
             for text, limit in (("Hello there!", 6), ("What does the word cat mean?", 3))]
    results: dict[int, tuple] = {}
    before = len(server.scheduler.batch_sizes)

    def worker(i, model, text, limit):
        results[i] = call(server, "/v1/chat/completions", chat_body(model, text, limit))

    threads = [threading.Thread(target=worker, args=(i, *case)) for i, case in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (model, text, limit) in enumerate(cases):
        status, body = results[i]
        assert status == 200, body
        expected = greedy(server.loaded, text, None if model == "tiny-base" else model, limit)
        assert body["choices"][0]["message"]["content"] == expected.text
        assert body["usage"]["completion_tokens"] == len(expected.token_ids) - (expected.finish_reason == "stop")
        assert body["choices"][0]["finish_reason"] == expected.finish_reason and body["model"] == model
    sizes = server.scheduler.batch_sizes[before:]
    assert sum(sizes) == len(cases) and max(sizes) >= 2  # requests of one adapter ran together


def test_completions_endpoint_raw_prompt(server, loaded):
    status, body = call(server, "/v1/completions", {"model": "alpha", "prompt": "Hello there", "max_tokens": 5,
                                                     "temperature": 0})
    expected = generate(loaded, ["Hello there"], SamplingOptions(max_new_tokens=5), adapter="alpha", chat=False)[0]
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected.text and body["usage"]["prompt_tokens"] == expected.prompt_tokens


def _sse(server, body):
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        lines = [line.decode().rstrip("\n") for line in resp]
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_streaming_chunks_add_up_to_the_answer(server):
    events = _sse(server, chat_body("beta", "Hello there!", 8, stream=True))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == greedy(server.loaded, "Hello there!", "beta", 8).text
    assert len(chunks) >= 3  # it really streamed in pieces


def _stop_case(loaded):
    """A (model, prompt, full answer, stop) whose answer holds a plain character after its start."""
    for adapter in (None, "alpha", "beta"):
        for prompt in ("Hello there!", "Hello there! How are you?", "What does the word cat mean?"):
            full = greedy(loaded, prompt, adapter, 8).text
            for i, char in enumerate(full):
                if i >= 1 and char != "\ufffd" and full.find(char) == i:
                    return adapter or loaded.base_name, prompt, full, char
    raise AssertionError("no usable stop string in the tiny model's answers")


def test_stop_string_cuts_the_answer(server):
    model, prompt, full, stop = _stop_case(server.loaded)
    status, body = call(server, "/v1/chat/completions", chat_body(model, prompt, 8, stop=[stop, "never-seen"]))
    assert status == 200 and body["choices"][0]["message"]["content"] == full[: full.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, status, code, param", [
    ({"model": "gamma", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found", "model"),
    ({"model": "../alpha", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found", "model"),
    ({"model": "/etc/passwd", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found", "model"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, None, "model"),
    ({"model": "alpha", "messages": []}, 400, None, "messages"),
    ({"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None, "messages[0].role"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, None, "temperature"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, None, "max_tokens"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, None, "n"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "hi " * 300}], "max_tokens": 8}, 400,
     "context_length_exceeded", "max_tokens"),
])
def test_bad_requests_get_openai_errors(server, body, status, code, param):
    got, answer = call(server, "/v1/chat/completions", body)
    assert got == status
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["code"] == code and answer["error"]["param"] == param


def test_malformed_json_oversized_body_unknown_route(loaded):
    srv = Server(loaded, ServeConfig(port=0, max_body_bytes=2000)).start()
    try:
        status, body = call(srv, "/v1/chat/completions", raw=b'{"model": "alpha", "messages": [')
        assert status == 400 and "not valid JSON" in body["error"]["message"]
        big = json.dumps(chat_body("alpha", "x" * 5000)).encode()
        status, body = call(srv, "/v1/chat/completions", raw=big)
        assert status == 413 and body["error"]["code"] == "request_too_large"
        status, body = call(srv, "/v1/embeddings", {"model": "alpha"})
        assert status == 404
    finally:
        srv.close()


def test_api_key(loaded):
    srv = Server(loaded, ServeConfig(port=0, api_key=KEY)).start()
    try:
        assert call(srv, "/health")[0] == 200
        status, body = call(srv, "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert call(srv, "/v1/chat/completions", chat_body("alpha", "hi"), key="wrong-key-000")[0] == 401
        assert call(srv, "/v1/models", key=KEY)[0] == 200
        status, body = call(srv, "/v1/chat/completions", chat_body("alpha", "hi", 2), key=KEY)
        assert status == 200 and body["usage"]["completion_tokens"] <= 2
    finally:
        srv.close()


def test_overload_answers_429_then_recovers(loaded):
    srv = Server(loaded, ServeConfig(port=0, max_queue=1, batch_wait_ms=0), start_scheduler=False).start()
    try:
        first: list = []
        thread = threading.Thread(target=lambda: first.append(call(srv, "/v1/chat/completions",
                                                                   chat_body("alpha", "Hello", 3))))
        thread.start()
        deadline = time.monotonic() + 30
        while srv.scheduler.waiting() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, body = call(srv, "/v1/chat/completions", chat_body("beta", "Hello", 3))
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        srv.scheduler.start()
        thread.join(timeout=60)
        assert first[0][0] == 200
        assert call(srv, "/v1/chat/completions", chat_body("beta", "Hello", 3))[0] == 200
    finally:
        srv.close()


def test_config_refuses_public_host_without_key():
    with pytest.raises(ValueError, match="exposes the server beyond this machine; set --api-key"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", api_key=KEY).is_local is False
    result = CliRunner().invoke(cli_app(), ["serve", "--model", "unused", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--api-key" in result.output
