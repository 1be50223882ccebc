"""ServeConfig: where the server listens and the limits it enforces. Defaults live here only."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """HTTP server settings; every limit answers a clear 4xx error when exceeded."""

    host: str = "127.0.0.1"
    """Address to bind; localhost by default. Binding elsewhere without an api_key is refused."""
    port: int = 8000
    """TCP port; 0 picks a free one (tests)."""
    api_key: str | None = None
    """When set, every /v1 request needs `Authorization: Bearer <api_key>` (compared in constant time)."""
    allow_public_without_key: bool = False
    """Allow a non-localhost host without api_key (e.g. behind an authenticating proxy)."""
    max_queue: int = 64
    """Requests waiting for the model, whichever adapter they ask for; one more is answered 429."""
    max_connections: int = 128
    """Connections served at once (one thread each); one more is answered 429 and closed."""
    read_timeout_s: float = 30.0
    """Longest wait for a whole request (request line, headers and body) once a connection is idle, and
    for a client to take each piece of an answer; slower clients get 408 and are disconnected."""
    max_batch_size: int = 8
    """Most requests generated together in one batch."""
    batch_wait_ms: float = 10.0
    """How long the scheduler waits for more requests of the same adapter before running a batch."""
    max_body_bytes: int = 1_000_000
    """Largest request body; larger ones are answered 413 without being read."""
    max_prompt_tokens: int = 4096
    """Longest prompt in tokens (after the chat template)."""
    max_tokens_limit: int = 2048
    """Largest max_tokens a request may ask for."""
    default_max_tokens: int = 256
    """max_tokens when a request gives none."""
    request_timeout_s: float = 600.0
    """A request waiting longer than this for its answer gets a 503."""
    access_log: bool = True
    """One line per request on stderr: time, client, method, path, status, bytes, ms, model (never the
    body or the API key); --no-access-log turns it off."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} must be in 0..65535")
        for name in ("max_queue", "max_connections", "max_batch_size", "max_body_bytes", "max_prompt_tokens",
                     "max_tokens_limit", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve {name}={getattr(self, name)} must be at least 1")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds max_tokens_limit="
                             f"{self.max_tokens_limit}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms={self.batch_wait_ms} must be >= 0")
        for name in ("read_timeout_s", "request_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"serve {name}={value!r} must be a positive number of seconds")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("--api-key must be at least 8 characters")
        if not self.is_local and self.api_key is None and not self.allow_public_without_key:
            raise ValueError(f"--host {self.host} exposes the server beyond this machine; set --api-key (or "
                             "--allow-public-without-key when a proxy authenticates)")

    @property
    def is_local(self) -> bool:
        if self.host in LOCAL_HOSTS:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
