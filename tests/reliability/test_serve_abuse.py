"""The server under abuse, load-tested on loopback: its queue bound holds across adapters, stalled or
half-sent requests cannot hold threads, bursts of connections are all accepted, clients that leave early
leave no traceback, every malformed request or unknown method gets an OpenAI-shaped JSON 4xx, and
out-of-range integers are a 400 naming the field. Every wait is bounded (time_limit around each attack).
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time

import pytest
from reliability_tools import count, time_limit

from slimtune.infer.serve import ServeConfig, Server
from slimtune.infer.serve.errors import APIError
from slimtune.infer.serve.protocol import parse_request

READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    from tiny_chat import build_tiny_chat

    from slimtune.infer import load_for_inference

    chat = build_tiny_chat(tmp_path_factory.mktemp("abuse"), {"alpha": 1})
    return load_for_inference(chat.base, adapters=chat.adapters, device="cpu")


@pytest.fixture
def serve(loaded):
    """Start a server with the given ServeConfig fields; closed after the test."""
    servers: list[Server] = []

    def start(**fields: object) -> Server:
        fields = {"port": 0, "read_timeout_s": READ_TIMEOUT, "max_tokens_limit": 4, "default_max_tokens": 2,
                  "request_timeout_s": 60, **fields}
        servers.append(Server(loaded, ServeConfig(**fields)).start())
        return servers[-1]

    yield start
    for srv in servers:
        with time_limit(30):
            srv.close()


def chat_request(model: str = "alpha", **extra: object) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2,
                       **extra}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def exchange(port: int, data: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method="HEAD" if data.startswith(b"HEAD") else None)
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def assert_openai_error(status: int, headers: dict[str, str], body: bytes, allowed: tuple[int, ...]) -> dict:
    assert status in allowed, (status, body[:300])
    assert headers.get("content-type") == "application/json", headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


# ---- the queue bound ---------------------------------------------------------------------------------------------
def test_max_queue_bounds_jobs_of_every_batch_key(serve) -> None:
    """30 requests of 30 different batch keys (seeds) against --max-queue 2: while the scheduler gathers a
    batch for the first key, the others may not pile up beside the queue."""
    srv = serve(max_queue=2, batch_wait_ms=3000, max_batch_size=8)
    answers: list[int] = []
    lock = threading.Lock()

    def one(seed: int) -> None:
        status, _, _ = exchange(srv.port, chat_request(temperature=1.0, seed=seed), timeout=60)
        with lock:
            answers.append(status)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(30)]
    with time_limit(60):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for _ in answers:
        count("serve_abuse_queue_bound")
    assert sorted(answers) == [200] * 2 + [429] * 28, answers


# ---- stalled and half-sent requests ------------------------------------------------------------------------------
def test_body_shorter_than_content_length_gets_408_in_bounded_time(serve) -> None:
    srv = serve()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    start = time.monotonic()
    with time_limit(15):
        status, headers, body = exchange(srv.port, head + b'{"model": ', timeout=10)
    count("serve_abuse_stalled_request")
    assert assert_openai_error(status, headers, body, (408,))["code"] == "request_timeout"
    assert time.monotonic() - start < READ_TIMEOUT + 3


def test_trickled_headers_cannot_outlive_the_read_deadline(serve) -> None:
    srv = serve()
    with time_limit(15), socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        with pytest.raises(OSError):  # the server answers 408 and closes while we are still sending headers
            while time.monotonic() - start < 8:
                sock.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.1)
        count("serve_abuse_stalled_request")
    assert time.monotonic() - start < READ_TIMEOUT + 3


def test_many_half_sent_requests_hold_bounded_threads_and_then_leave(serve) -> None:
    """300 connections that never finish their headers, against max_connections 16: threads stay bounded,
    every one is answered 408 (in a slot) or 429 (over the limit) and closed, then the server serves again."""
    srv = serve(max_connections=16)
    threads_before = threading.active_count()
    socks = []
    with time_limit(60):
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            socks.append(sock)
        time.sleep(0.3)
        peak = threading.active_count() - threads_before
        statuses = []
        for sock in socks:
            response = http.client.HTTPResponse(sock)
            response.begin()
            error = json.loads(response.read())["error"]
            assert error["message"] and response.getheader("Content-Type") == "application/json"
            statuses.append(response.status)
            sock.close()
            count("serve_abuse_half_sent_headers")
        status, _, body = exchange(srv.port, chat_request())
    assert peak <= 16 + 2, peak  # one thread per served connection (+ slack for threads ending)
    assert set(statuses) <= {408, 429} and statuses.count(408) >= 16, statuses
    assert status == 200, body


# ---- bursts of connections ---------------------------------------------------------------------------------------
def test_fifty_concurrent_connections_are_all_accepted(serve) -> None:
    srv = serve()
    assert srv.httpd.request_queue_size >= 50
    gate = threading.Barrier(50)
    answers: list[object] = []

    def one() -> None:
        gate.wait()
        try:
            answers.append(exchange(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=20)[0])
        except OSError as err:  # a reset or refused connection is what this test forbids
            answers.append(repr(err))

    for _ in range(3):  # three bursts
        threads = [threading.Thread(target=one) for _ in range(50)]
        with time_limit(60):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    for _ in answers:
        count("serve_abuse_connection_burst")
    assert answers == [200] * 150, [a for a in answers if a != 200][:5]


# ---- clients that leave early ----------------------------------------------------------------------------------------
def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("leave", ["mid-headers", "mid-body", "before-answer", "mid-stream"])
def test_a_client_that_leaves_early_leaves_no_traceback(serve, capfd, leave: str) -> None:
    srv = serve()
    request = chat_request(stream=leave == "mid-stream", max_tokens=4)
    cut = {"mid-headers": request.index(b"Content-Length"), "mid-body": len(request) - 5}.get(leave, len(request))
    with time_limit(30):
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.sendall(request[:cut])
            if leave == "mid-stream":
                sock.recv(64)
            time.sleep(0.05)
            _reset(sock)
            count("serve_abuse_early_disconnect")
        time.sleep(0.5)
        assert exchange(srv.port, chat_request())[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "failed:" not in err, err[-2000:]


# ---- malformed requests and other verbs ---------------------------------------------------------------------------------
MALFORMED = {
    "PUT": (b"PUT /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    "DELETE": (b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "PATCH": (b"PATCH /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "OPTIONS": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "TRACE": (b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "made-up verb": (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "no version (HTTP/0.9)": (b"GET /health\r\n\r\n", 400),
    "HTTP/2.0": (b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 400),
    "bad version": (b"GET /health HTTP/1.x\r\nHost: x\r\n\r\n", 400),
    "not HTTP": (b"GET /health FTP/1.0\r\n\r\n", 400),
    "one word": (b"HELLO\r\n\r\n", 400),
    "four words": (b"GET / x HTTP/1.1\r\n\r\n", 400),
    "binary line": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "line too long": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    "header too long": (b"GET /health HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431),
    "too many headers": (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
                         431),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests_and_other_verbs_get_json_4xx(serve, name: str) -> None:
    srv = serve()
    data, expected = MALFORMED[name]
    with time_limit(20):
        status, headers, body = exchange(srv.port, data)
    count("serve_abuse_malformed_http")
    assert_openai_error(status, headers, body, (expected,))
    if expected == 405:
        assert headers.get("allow") == "GET, POST"


def test_head_gets_a_405_without_a_body(serve) -> None:
    srv = serve()
    with time_limit(20):
        status, headers, body = exchange(srv.port, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    count("serve_abuse_malformed_http")
    assert status == 405 and headers.get("content-type") == "application/json" and body == b""


# ---- out-of-range integers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1, 10**30, -(10**4000)],
                         ids=["2**64", "2**63", "-2**63-1", "10**30", "-10**4000"])
def test_out_of_range_seed_is_a_400_naming_seed(serve, seed: int) -> None:
    with pytest.raises(APIError) as caught:
        parse_request({"model": "alpha", "prompt": "x", "seed": seed}, False, 2, 4)
    assert caught.value.status == 400 and caught.value.param == "seed" and len(caught.value.message) < 200
    srv = serve()
    with time_limit(30):
        status, headers, body = exchange(srv.port, chat_request(seed=seed, temperature=1.0))
    count("serve_abuse_out_of_range_int")
    assert assert_openai_error(status, headers, body, (400,))["param"] == "seed"


@pytest.mark.parametrize("seed", [0, 2**63 - 1, -(2**63)], ids=["0", "2**63-1", "-2**63"])
def test_seeds_at_the_limits_still_generate(serve, seed: int) -> None:
    srv = serve()
    with time_limit(30):
        status, _, body = exchange(srv.port, chat_request(seed=seed, temperature=1.0))
    count("serve_abuse_out_of_range_int")
    assert status == 200, body
