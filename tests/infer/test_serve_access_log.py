"""The access log on a live server: exactly one line per request, whatever its fate (answered, refused
with a 4xx, failed auth, malformed, refused at accept time, timed out, left by its client), with time,
client, method, path, status, bytes, duration and model, and never the API key or the body."""

from __future__ import annotations

import io
import json
import re
import socket
import time

from test_serve import call, chat_body

from slimtune.infer.serve import ServeConfig, Server
from slimtune.infer.serve.access_log import AccessLog, clean

KEY = "log-key-1234567"
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (\S+) (\S+) (\S+) (\d{3}|-) (\d+) (\d+\.\d)ms "
                  r"model=(\S+)( aborted)?$")


def _raw(server, data: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(data)
        if not read:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def _lines(stream: io.StringIO, expected: int) -> list[re.Match]:
    deadline = time.monotonic() + 30
    while stream.getvalue().count("\n") < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a line too many would show up now
    lines = stream.getvalue().splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert len(lines) == expected, "\n".join(lines)
    return matches


def test_one_line_per_request_and_no_secrets(loaded):
    stream = io.StringIO()
    srv = Server(loaded, ServeConfig(port=0, api_key=KEY, read_timeout_s=1.0, max_body_bytes=5000),
                 access_log=AccessLog(stream)).start()
    try:
        secret_text = "my-private-prompt-text"
        assert call(srv, "/health")[0] == 200
        assert call(srv, "/v1/models")[0] == 401
        assert call(srv, "/v1/chat/completions", chat_body("alpha", secret_text, 2), key="wrong-key-000")[0] == 401
        assert call(srv, "/v1/chat/completions", chat_body("alpha", secret_text, 2), key=KEY)[0] == 200
        assert call(srv, "/v1/chat/completions", chat_body("beta", secret_text, 2, tools=[{}]), key=KEY)[0] == 400
        assert call(srv, "/v1/models/gamma", key=KEY)[0] == 404
        assert call(srv, "/v1/embeddings", {"model": "alpha"}, key=KEY)[0] == 404
        assert call(srv, "/v1/chat/completions", chat_body("alpha", "x" * 6000), key=KEY)[0] == 413
        assert _raw(srv, b"BREW /pot HTTP/1.1\r\n\r\n")[9:12] == b"405"
        assert _raw(srv, b"garbage\r\n\r\n")[9:12] == b"400"
        half = (f"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 500\r\n\r\n"
                '{"model": "alpha"').encode()
        assert _raw(srv, half)[9:12] == b"408"
        _raw(srv, b"", read=False)  # a connection without a request: no line
        body = json.dumps({**chat_body("alpha", secret_text, 64), "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:  # leaves mid-stream
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert sock.recv(16).startswith(b"HTTP/1.")
        matches = _lines(stream, 12)
    finally:
        srv.close()
    text = stream.getvalue()
    assert KEY not in text and secret_text not in text and "Bearer" not in text
    got = [(m[2], m[3], m[4], m[7]) for m in matches]
    assert got == [
        ("GET", "/health", "200", "-"), ("GET", "/v1/models", "401", "-"),
        ("POST", "/v1/chat/completions", "401", "-"), ("POST", "/v1/chat/completions", "200", "alpha"),
        ("POST", "/v1/chat/completions", "400", "beta"), ("GET", "/v1/models/gamma", "404", "gamma"),
        ("POST", "/v1/embeddings", "404", "-"), ("POST", "/v1/chat/completions", "413", "-"),
        ("BREW", "/pot", "405", "-"), ("-", "-", "400", "-"), ("POST", "/v1/chat/completions", "408", "-"),
        ("POST", "/v1/chat/completions", "200", "alpha"),
    ]
    assert matches[-1][8] == " aborted" and not any(m[8] for m in matches[:-1])
    assert all(m[1] == "127.0.0.1" and int(m[5]) > 0 for m in matches)


def test_refused_at_accept_time_and_switched_off(loaded):
    stream = io.StringIO()
    srv = Server(loaded, ServeConfig(port=0, max_connections=1, read_timeout_s=1.0),
                 access_log=AccessLog(stream)).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as held:
            time.sleep(0.2)
            assert _raw(srv, b"GET /health HTTP/1.1\r\n\r\n")[9:12] == b"429"
            assert held.recv(65536)[9:12] == b"408"  # idle past read_timeout_s
        matches = _lines(stream, 2)
        assert sorted(m[4] for m in matches) == ["408", "429"]
    finally:
        srv.close()
    quiet = Server(loaded, ServeConfig(port=0, access_log=False)).start()
    try:
        assert quiet.access_log is None and call(quiet, "/health")[0] == 200
    finally:
        quiet.close()


def test_client_text_cannot_split_or_forge_lines():
    assert clean("/a b\r\n2026 fake") == "/a\\x20b\\x0d\\x0a2026\\x20fake"
    assert clean("m" * 500).endswith("...") and len(clean("m" * 500)) == 203
    assert clean(None) == clean("") == "-"
