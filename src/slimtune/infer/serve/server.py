"""The API side: routes, auth, limits, JSON and server-sent events (on transport.BoundedHTTPServer).

Routes: GET /v1/models, GET /v1/models/{id}, GET /health, POST /v1/chat/completions, POST /v1/completions.
Order of checks for a POST: auth (401) -> Content-Length present (411) and within max_body_bytes (413,
the body is never read) -> the whole body within read_timeout_s (408) -> JSON (400) -> fields (400)
-> model known (404) -> prompt length (400) -> queue has room (429). The `model` field is only ever a
key into the adapters given at start-up: no path from a request is opened. Chat messages are encoded
with their content's control tokens as plain text (see slimtune.data.control_tokens): a user cannot
forge turns.
"""

from __future__ import annotations

import hmac
import json
import queue
import threading
import time
from typing import Any
from urllib.parse import unquote

from slimtune.data.control_tokens import ControlTokenError
from slimtune.infer.generation import encode, encode_chat
from slimtune.infer.loading import LoadedModel
from slimtune.infer.serve.access_log import AccessLog
from slimtune.infer.serve.config import ServeConfig
from slimtune.infer.serve.errors import APIError
from slimtune.infer.serve.protocol import (
    ParsedRequest,
    chunk_body,
    completion_body,
    model_body,
    models_body,
    new_id,
    parse_request,
    usage_chunk_body,
)
from slimtune.infer.serve.scheduler import Job, Overloaded, Scheduler
from slimtune.infer.serve.transport import BoundedHTTPServer, JSONRequestHandler

ROUTES = {"/v1/chat/completions": True, "/v1/completions": False}
MODEL_PREFIX = "/v1/models/"
"""GET /v1/models/{id}: one model object, by the (URL-encoded) name of the base model or an adapter."""


class Server:
    """One loaded model (with adapters) behind an OpenAI-compatible HTTP API."""

    def __init__(self, loaded: LoadedModel, config: ServeConfig | None = None, start_scheduler: bool = True,
                 access_log: AccessLog | None = None) -> None:
        """access_log: where request lines go; by default stderr when config.access_log is on."""
        self.loaded = loaded
        self.config = config or ServeConfig()
        self.access_log = access_log or (AccessLog() if self.config.access_log else None)
        self.scheduler = Scheduler(loaded, self.config.max_queue, self.config.max_batch_size,
                                   self.config.batch_wait_ms / 1000.0)
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share across threads
        self.httpd = BoundedHTTPServer((self.config.host, self.config.port), _handler_class(self),
                                       self.config.max_connections)
        self.httpd.access_log = self.access_log
        self._thread: threading.Thread | None = None
        self._serving = False
        if start_scheduler:
            self.scheduler.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def model_names(self) -> list[str]:
        return [self.loaded.base_name, *self.loaded.adapters]

    def serve_forever(self) -> None:
        self._serving = True
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def start(self) -> Server:
        """Serve from a background thread (tests, notebooks)."""
        self._serving = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="slimtune-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._serving:  # shutdown() waits for serve_forever, which must have started
            self._serving = False
            self.httpd.shutdown()
        self.httpd.server_close()
        self.scheduler.stop()

    # ---- request handling (called from HTTP threads) --------------------------------------------------
    def adapter_for(self, model: str) -> str | None:
        if model == self.loaded.base_name:
            return None
        if model in self.loaded.adapters:
            return model
        raise APIError(404, f"The model '{model}' does not exist; available: {', '.join(self.model_names())}",
                       "model", "model_not_found")

    def make_job(self, request: ParsedRequest) -> Job:
        adapter = self.adapter_for(request.model)
        tokenizer = self.loaded.tokenizer
        with self._tokenizer_lock:
            if request.chat:
                try:
                    ids = encode_chat(tokenizer, request.messages)
                except ControlTokenError as err:
                    raise APIError(400, str(err), "messages") from None
                except Exception as err:  # a template rejecting the conversation (e.g. role order)
                    raise APIError(400, f"the chat template cannot render these messages: {err}", "messages") from None
            else:
                ids = encode(tokenizer, [request.prompt], chat=False)[0]
        limit = self.config.max_prompt_tokens
        context = getattr(getattr(self.loaded.model, "config", None), "max_position_embeddings", None)
        if not ids:
            raise APIError(400, "the prompt is empty after tokenization", "prompt")
        if len(ids) > limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is {limit}", "messages",
                           "context_length_exceeded")
        if context and len(ids) + request.options.max_new_tokens > context:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({request.options.max_new_tokens}) exceeds "
                           f"the model's context of {context} tokens", "max_tokens", "context_length_exceeded")
        return Job(adapter, ids, request.options, request.stop)

    def submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)
        except Overloaded:
            raise APIError(429, f"the server is busy ({self.config.max_queue} requests waiting); retry later",
                           None, "rate_limit_exceeded", "rate_limit_error") from None

    def check_auth(self, header: str | None) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = header[len("Bearer "):] if header and header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")


def _handler_class(server: Server) -> type[_Handler]:
    class Handler(_Handler):
        app = server
        read_timeout_s = server.config.read_timeout_s
        access_log = server.access_log

    return Handler


class _Handler(JSONRequestHandler):
    app: Server

    # ---- GET ------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self.request_read()
        try:
            if self.path == "/health":
                self.send_json(200, {"status": "ok"})
                return
            self.app.check_auth(self.headers.get("Authorization"))
            if self.path == "/v1/models":
                self.send_json(200, models_body(self.app.model_names(), self.app.loaded.base_name))
                return
            if self.path.startswith(MODEL_PREFIX):
                name = unquote(self.path[len(MODEL_PREFIX):].split("?", 1)[0])
                self.log_model = name
                self.app.adapter_for(name)  # 404 model_not_found unless served
                self.send_json(200, model_body(name, self.app.loaded.base_name))
                return
            raise APIError(404, f"no route GET {self.path}", code="not_found")
        except APIError as err:
            self.send_json(err.status, err.body())

    # ---- POST -----------------------------------------------------------------------------------
    def do_POST(self) -> None:
        try:
            self.app.check_auth(self.headers.get("Authorization"))
            if self.path not in ROUTES:
                raise APIError(404, f"no route POST {self.path}", code="not_found")
            body = self._read_json()
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                self.log_model = body["model"]
            chat = ROUTES[self.path]
            cfg = self.app.config
            request = parse_request(body, chat, cfg.default_max_tokens, cfg.max_tokens_limit)
            job = self.app.make_job(request)
            self.app.submit(job)
        except APIError as err:
            self.close_connection = self.close_connection or err.status in (408, 411, 413)
            self.send_json(err.status, err.body())
            return
        except (TimeoutError, ConnectionError):
            raise  # the transport answers 408 or drops the connection of a client that left
        except Exception as err:  # a bug must still answer JSON, never drop the connection with a traceback
            self.send_json(500, APIError(500, f"internal error: {type(err).__name__}", kind="server_error").body())
            return
        if request.stream:
            self._stream(job, request, len(job.prompt_ids))
        else:
            self._complete(job, request, len(job.prompt_ids))

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):  # "²".isdigit() is True
            raise APIError(411, "a Content-Length header (a decimal byte count) is required; chunked bodies are "
                           "not accepted")
        if len(length) > 15 or int(length) > self.app.config.max_body_bytes:  # int() of 4300+ digits raises
            raise APIError(413, f"request body of {length} bytes exceeds the limit of "
                           f"{self.app.config.max_body_bytes} bytes", code="request_too_large")
        raw = self.rfile.read(int(length))
        self.request_read()
        if len(raw) < int(length):
            raise APIError(400, f"the body ended after {len(raw)} of the {length} bytes of its Content-Length",
                           code="incomplete_body")
        try:
            return json.loads(raw)
        except RecursionError:
            raise APIError(400, "the request body is not usable JSON: nested too deeply") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            raise APIError(400, f"the request body is not valid JSON: {err}") from None

    def _complete(self, job: Job, request: ParsedRequest, prompt_tokens: int) -> None:
        deadline = time.monotonic() + self.app.config.request_timeout_s
        while True:
            try:
                kind, payload = job.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                job.cancelled.set()
                self.send_json(503, APIError(503, "timed out waiting for the model", code="timeout",
                                             kind="server_error").body())
                return
            if kind == "error":
                self.send_json(500, APIError(500, payload, kind="server_error").body())
                return
            if kind == "done":
                text, finish, tokens = payload
                self.send_json(200, completion_body(new_id(request.chat), request.model, request.chat, text, finish,
                                                    prompt_tokens, tokens))
                return

    def _stream(self, job: Job, request: ParsedRequest, prompt_tokens: int) -> None:
        rid = new_id(request.chat)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        first = True
        deadline = time.monotonic() + self.app.config.request_timeout_s
        try:
            while True:
                kind, payload = job.events.get(timeout=max(0.0, deadline - time.monotonic()))
                if kind == "delta":
                    self._event(chunk_body(rid, request.model, request.chat, payload, None, first,
                                           request.include_usage))
                    first = False
                elif kind == "done":
                    self._event(chunk_body(rid, request.model, request.chat, None, payload[1], first,
                                           request.include_usage))
                    if request.include_usage:
                        self._event(usage_chunk_body(rid, request.model, request.chat, prompt_tokens, payload[2]))
                    break
                else:
                    self._event(APIError(500, payload, kind="server_error").body())
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (ConnectionError, TimeoutError, queue.Empty):
            self.aborted = True
            job.cancelled.set()  # the client left, stopped reading, or we gave up: stop generating its row

    def _event(self, body: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()
