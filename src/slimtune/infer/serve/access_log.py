"""The access log: one line per HTTP request, written whole (one write under a lock).

    2026-12-06T04:03:00.123Z 127.0.0.1 POST /v1/chat/completions 200 812 35.2ms model=alpha

Fields: UTC time the request began, client address, method, path, status (`-` when no answer was sent),
bytes sent (status line, headers and body), duration in milliseconds, the model the request named (`-`
when none), and ` aborted` when the client left before the answer ended. The request body and headers
(so the API key) are never written; client-supplied text (path, model) is cut and its control
characters and spaces are escaped, so a client cannot forge or split lines.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

MAX_FIELD = 200
"""Longest path or model name written; longer ones are cut and end with `...`."""


def clean(text: str | None) -> str:
    """Client text as one log field: no spaces or control characters, at most MAX_FIELD characters."""
    if not text:
        return "-"
    text = text if len(text) <= MAX_FIELD else text[:MAX_FIELD] + "..."
    return "".join(c if c.isprintable() and not c.isspace() else f"\\x{ord(c):02x}" for c in text)


class AccessLog:
    """Writes access lines to a text stream (stderr by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, started: float, client: str, method: str | None, path: str | None, status: int | None,
              sent: int, duration_s: float, model: str | None = None, aborted: bool = False) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)) + f".{int(started % 1 * 1000):03d}Z"
        line = (f"{stamp} {clean(client)} {clean(method)} {clean(path)} {status if status else '-'} {sent} "
                f"{duration_s * 1000:.1f}ms model={clean(model)}{' aborted' if aborted else ''}\n")
        stream = self.stream or sys.stderr
        with self.lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken log stream must not fail the request
