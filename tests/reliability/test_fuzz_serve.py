"""Fuzzing the OpenAI-compatible server: `parse_request` with random JSON bodies, and a live server (stdlib
ThreadingHTTPServer on 127.0.0.1, tiny model) with random bodies, paths and headers sent over a raw socket.

Every request ends in an answer within its timeout: 200 with a completion, or a 4xx whose body is OpenAI's
JSON error object; never a 5xx, a dropped connection, or a hang. Bodies shorter than their Content-Length
and methods other than GET and POST are part of the mix (408 after the read timeout; 405).
"""

from __future__ import annotations

import http.client
import json
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from reliability_tools import count, fuzz_settings, time_limit

from slimtune.infer.serve.errors import APIError
from slimtune.infer.serve.protocol import ParsedRequest, parse_request

KEY = "reliability-key-123"
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12))
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=10)
MESSAGE = st.one_of(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]),
                                                             JSON),
                                           "content": st.one_of(st.text(max_size=30), JSON, st.lists(
                                               st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                                                      "text": st.one_of(st.text(max_size=10), JSON)}),
                                               max_size=2))}), JSON)
FIELDS = {"model": st.one_of(st.sampled_from(["tiny-base", "alpha", "../alpha", "/etc/passwd", "", "ALPHA"]), JSON),
          "messages": st.one_of(st.lists(MESSAGE, max_size=3), JSON),
          "prompt": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=5), max_size=2), JSON),
          "max_tokens": st.one_of(st.integers(-2, 5), st.sampled_from([10**9, 2.5, True, "3"]), JSON),
          "max_completion_tokens": st.one_of(st.integers(-1, 4), JSON),
          "temperature": st.one_of(st.floats(-1, 3), st.sampled_from([float("nan"), float("inf")]), JSON),
          "top_p": st.one_of(st.floats(-1, 2), JSON), "stop": st.one_of(st.text(max_size=3), st.lists(
              st.text(max_size=3), max_size=6), JSON),
          "seed": st.one_of(st.integers(-(2**70), 2**70), JSON), "stream": st.one_of(st.booleans(), JSON),
          "n": st.one_of(st.integers(0, 3), JSON)}
BODY = st.one_of(st.fixed_dictionaries({}, optional=FIELDS), JSON)


@given(body=BODY, chat=st.booleans())
@fuzz_settings(800)
def test_fuzz_parse_request(body: object, chat: bool) -> None:
    count("serve_parse_request")
    try:
        with time_limit(5):
            request = parse_request(body, chat, default_max_tokens=4, max_tokens_limit=8)
    except APIError as err:
        assert 400 <= err.status < 500 and err.message and err.body()["error"]["message"] == err.message
        return
    assert isinstance(request, ParsedRequest) and isinstance(request.model, str) and request.model
    assert 1 <= request.options.max_new_tokens <= 8 and 0 <= request.options.temperature <= 2
    assert all(isinstance(s, str) and s for s in request.stop)
    if chat:
        assert request.messages and all(isinstance(m["content"], str) for m in request.messages)
    else:
        assert isinstance(request.prompt, str) and request.prompt


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from tiny_chat import build_tiny_chat

    from slimtune.infer import load_for_inference
    from slimtune.infer.serve import ServeConfig, Server

    chat = build_tiny_chat(tmp_path_factory.mktemp("serve"), {"alpha": 1})
    loaded = load_for_inference(chat.base, adapters=chat.adapters, device="cpu")
    srv = Server(loaded, ServeConfig(port=0, api_key=KEY, max_body_bytes=20_000, max_tokens_limit=4,
                                     default_max_tokens=2, batch_wait_ms=0, request_timeout_s=20,
                                     read_timeout_s=0.5)).start()
    yield srv
    srv.close()


def raw_request(port: int, head: bytes, body: bytes, method: str = "POST") -> tuple[int, bytes]:
    """Send bytes as they are; (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head + body)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return response.status, response.read()


HEADER_VALUE = st.one_of(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=20),
                         st.sampled_from(["0", "-1", "²", "1e3", "9" * 30, " 12", "12 ", ""]))


@given(body=st.one_of(BODY.map(lambda b: json.dumps(b).encode()), st.binary(max_size=200),
                      st.sampled_from([b"[" * 5000, b'{"model": ' + b"9" * 5000 + b"}", b"\xff\xfe{}", b"",
                                       json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 2}).encode()])),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/../../etc/passwd",
                             "/v1/chat/completions?x=1", "/"]),
       method=st.sampled_from(["POST", "GET", "POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "BREW", "get"]),
       auth=st.one_of(st.just(f"Bearer {KEY}"), st.none(), HEADER_VALUE, st.just(f"Bearer {KEY}x")),
       length=st.one_of(st.none(), HEADER_VALUE), extra=st.dictionaries(
           st.sampled_from(["Content-Type", "Transfer-Encoding", "Expect", "X-Junk"]), HEADER_VALUE, max_size=2))
@fuzz_settings(150)
def test_fuzz_live_server(server, body: bytes, path: str, method: str, auth: str | None, length: str | None,
                          extra: dict[str, str]) -> None:
    count("serve_live_http")
    headers = {"Host": "127.0.0.1", "Connection": "close", **extra}
    if auth is not None:
        headers["Authorization"] = auth
    if "Transfer-Encoding" in headers or "Expect" in headers:  # stdlib http.server semantics, not ours
        headers.pop("Transfer-Encoding", None)
        headers.pop("Expect", None)
    headers["Content-Length"] = str(len(body)) if length is None else length
    head = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
        f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()) + b"\r\n"
    with time_limit(30):  # a body shorter than its Content-Length is answered 408 after read_timeout_s
        status, answer = raw_request(server.port, head, body, method)
    assert status < 500, (status, answer[:300])
    if method == "HEAD":
        assert status == 405 and answer == b""
        return
    if status == 200 and answer.startswith(b"data: "):  # a streamed completion
        assert answer.rstrip().endswith(b"data: [DONE]")
        return
    parsed = json.loads(answer)
    if status >= 400:
        assert parsed["error"]["message"], parsed
    elif "completions" in path:
        assert parsed["choices"][0]["finish_reason"] in ("stop", "length")
