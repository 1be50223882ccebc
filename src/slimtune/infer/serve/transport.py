"""The HTTP transport under the API: a bounded threading server and a request handler whose every read
has a deadline and whose every protocol error is an OpenAI-shaped JSON 4xx.

Bounds, so that no client can hold the server:
- at most `max_connections` connections are served at once (one thread each); one more is answered 429
  at once, from the accept loop, and closed;
- the listen backlog is LISTEN_BACKLOG, so bursts of connections wait for accept() instead of being reset;
- a request (line, headers and body) must arrive within `read_timeout_s` of the connection becoming idle;
  a client that sends less than it announced, or trickles bytes, gets 408 and is disconnected. The
  same timeout bounds every write to a client that stops reading;
- a client that leaves early ends its connection quietly (no traceback on the server's stderr).
Every request that was received or answered (refusals at accept time included) gets one access-log line
when the server has an AccessLog (see slimtune.infer.serve.access_log).
The standard library answers malformed request lines, over-long lines (414), too many or too long
headers (431), unknown methods (501) and HTTP/2+ (505) with HTML; here `send_error` answers JSON and
turns the two 5xx into 405 and 400: the fault lies with the request.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO

from slimtune.infer.serve.access_log import AccessLog
from slimtune.infer.serve.errors import APIError

LISTEN_BACKLOG = 1024
"""Connections the kernel queues before accept(); the kernel caps it at net.core.somaxconn."""
ERROR_WRITE_TIMEOUT_S = 5.0
"""Longest wait to send an error answer to a client that is not reading."""
MAX_LINE = 65536
"""Longest request line; longer ones get 414 (the standard library's limit)."""
CLIENT_FAULTS = {HTTPStatus.NOT_IMPLEMENTED: HTTPStatus.METHOD_NOT_ALLOWED,
                 HTTPStatus.HTTP_VERSION_NOT_SUPPORTED: HTTPStatus.BAD_REQUEST}
"""Statuses the standard library sends for a client's bad request, and the 4xx we answer instead."""
METHODS = ("GET", "POST")


class DeadlineReader:
    """The connection's input stream, where every read waits at most until the current deadline."""

    def __init__(self, raw: BinaryIO, sock: socket.socket, idle_timeout_s: float) -> None:
        self.raw, self.sock, self.idle_timeout_s = raw, sock, idle_timeout_s
        self.deadline: float | None = None

    def start(self) -> None:
        """A new request begins: it must have arrived completely within idle_timeout_s."""
        self.deadline = time.monotonic() + self.idle_timeout_s

    def finish(self) -> None:
        """The request is read; later socket operations (writes) get the idle timeout each."""
        self.deadline = None
        self.sock.settimeout(self.idle_timeout_s)

    def _arm(self) -> None:
        if self.deadline is None:
            return
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(remaining)

    def readline(self, limit: int = -1) -> bytes:
        """One line (with its newline), at most `limit` bytes; each wait for the socket is one recv."""
        line = bytearray()
        while limit < 0 or len(line) < limit:
            self._arm()
            ahead = self.raw.peek(1)  # at most one recv: the deadline holds for trickled bytes too
            if not ahead:
                break
            room = len(ahead) if limit < 0 else min(len(ahead), limit - len(line))
            newline = ahead.find(b"\n", 0, room)
            line += self.raw.read(newline + 1 if newline >= 0 else room)  # already buffered: no wait
            if newline >= 0:
                break
        return bytes(line)

    def read(self, size: int) -> bytes:
        """`size` bytes, fewer only when the client closed its side."""
        chunks, got = [], 0
        while got < size:
            self._arm()
            chunk = self.raw.read1(size - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed


class CountingWriter:
    """The connection's output stream, counting the bytes written (for the access log)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sent = raw, 0

    def write(self, data: bytes) -> int:
        written = self.raw.write(data)
        self.sent += len(data)
        return written

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return bool(self.raw.closed)


class BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on live connections and a deep listen backlog."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 max_connections: int) -> None:
        self.max_connections = max_connections
        self.access_log: AccessLog | None = None
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):
            return  # the client left or stalled: its connection is closed, nothing to report
        host = client_address[0] if isinstance(client_address, tuple) and client_address else client_address
        print(f"slimtune serve: connection from {host} failed: {type(err).__name__}: {err}", file=sys.stderr)

    def _refuse(self, sock: socket.socket, client_address: Any) -> None:
        """Answer 429 from the accept loop without blocking it, then close. What the client has sent
        so far is read first: closing a socket with unread data resets it, and the reset can reach the
        client before it has read the answer."""
        body = json.dumps(APIError(429, f"the server has {self.max_connections} open connections, its limit; "
                                   "retry later", None, "rate_limit_exceeded", "rate_limit_error").body()).encode()
        head = (f"HTTP/1.0 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nConnection: close\r\n\r\n").encode()
        started, begun, sent = time.time(), time.monotonic(), 0
        try:
            sock.setblocking(False)
            sent = sock.send(head + body)  # a few hundred bytes: the empty send buffer of a new socket takes them
            while sock.recv(65536):
                pass
        except OSError:
            pass  # nothing more to read now (BlockingIOError), or the client has gone
        finally:
            self.shutdown_request(sock)
            if self.access_log is not None:  # the request itself is never read: method and path unknown
                host = client_address[0] if isinstance(client_address, tuple) and client_address else "-"
                self.access_log.write(started, str(host), None, None, 429, sent, time.monotonic() - begun)


class JSONRequestHandler(BaseHTTPRequestHandler):
    """Request handling with bounded reads and JSON errors; subclasses define do_GET and do_POST."""

    read_timeout_s: float = 30.0
    """Set by the server: see the module docstring."""
    access_log: AccessLog | None = None
    """Set by the server: where each request's line goes (None: no access log)."""
    server_version = "slimtune"

    def setup(self) -> None:
        self.timeout = self.read_timeout_s
        super().setup()
        self.reader = DeadlineReader(self.rfile, self.connection, self.read_timeout_s)
        self.rfile = self.reader  # type: ignore[assignment]  (the stdlib reads the request line and headers here)
        self.writer = CountingWriter(self.wfile)
        self.wfile = self.writer  # type: ignore[assignment]
        self.response_started = False

    def request_read(self) -> None:
        """The request is read whole: from now on only writes wait, each up to read_timeout_s."""
        self.reader.finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass  # the access log (slimtune.infer.serve.access_log) writes one line per request instead

    def send_response(self, code: int, message: str | None = None) -> None:
        self.response_started = True
        self.status_sent = code
        super().send_response(code, message)

    def handle_one_request(self) -> None:
        """The standard library's request cycle, with a deadline on reading and without tracebacks for
        clients that leave."""
        self.response_started = False
        self.status_sent: int | None = None
        self.log_model: str | None = None
        """The model the request named, for the access log; set by the API handler."""
        self.aborted = False
        self.raw_requestline = b""
        self.command = self.path = None  # type: ignore[assignment]
        self.requestline, self.request_version = "", self.protocol_version  # until a request line is parsed
        self.writer.sent = 0
        started, begun = time.time(), time.monotonic()
        self.reader.start()
        try:
            self._handle_one_request()
        finally:
            if self.access_log is not None and (self.raw_requestline or self.response_started):
                host = self.client_address[0] if isinstance(self.client_address, tuple) else self.client_address
                self.access_log.write(started, str(host), self.command, self.path, self.status_sent, self.writer.sent,
                                      time.monotonic() - begun, self.log_model, self.aborted)

    def _handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
            if len(self.raw_requestline) > MAX_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, f"the request line is longer than {MAX_LINE} bytes")
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            if self.command not in METHODS:
                self.send_error(HTTPStatus.NOT_IMPLEMENTED)
                return
            getattr(self, "do_" + self.command)()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True
            self.aborted = self.response_started  # a client that stopped reading the answer
            self.answer_error(408, f"the request did not arrive within {self.read_timeout_s:g} s: send the "
                              "request line, the headers and a body as long as its Content-Length at once",
                              "request_timeout")
        except ConnectionError:
            self.close_connection = True  # the client left
            self.aborted = True

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # a request line without a version: no headers follow
            self.send_error(HTTPStatus.BAD_REQUEST, "the request line needs an HTTP version (HTTP/1.0 or 1.1)")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's error path (malformed requests), answered as JSON."""
        status = HTTPStatus(CLIENT_FAULTS.get(HTTPStatus(code), HTTPStatus(code)))
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            text = f"method {self.command!r} is not allowed; use {' or '.join(METHODS)}"
        elif code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            text = f"{message or 'this HTTP version'} is not supported; use HTTP/1.0 or HTTP/1.1"
        else:
            text = message or status.phrase
            if explain and explain not in text:
                text = f"{text}: {explain}"
        if self.request_version in ("HTTP/0.9", None):
            self.request_version = self.protocol_version  # always answer with a status line and headers
        self.answer_error(int(status), text[:500], status.phrase.lower().replace(" ", "_"))

    def answer_error(self, status: int, message: str, code: str | None = None,
                     kind: str = "invalid_request_error") -> None:
        """Send a JSON error unless an answer has begun; the connection closes after it."""
        self.close_connection = True
        if self.response_started:
            return
        try:
            self.connection.settimeout(min(self.read_timeout_s, ERROR_WRITE_TIMEOUT_S))
            self.send_json(status, APIError(status, message, None, code, kind).body())
        except OSError:
            pass  # the client is gone

    def send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", ", ".join(METHODS))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
