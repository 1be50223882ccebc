"""The batching scheduler: one thread owns the model and runs waiting requests in batches.

HTTP threads submit Jobs to one waiting list of at most max_queue jobs (full -> Overloaded -> 429);
every job that is not yet generating counts, whatever its batch key. The scheduler takes the oldest
job, then gathers up to max_batch_size - 1 more with the same batch key (adapter and sampling
settings: one `generate` call has one adapter and one sampler) for at most batch_wait; jobs of other
keys keep their place, in arrival order. A batch is one left-padded `generate_ids` call; each row keeps
its own max_new_tokens and stops (see generation.RowLimits), so greedy answers are the same tokens a
single-request run gives. Tokens stream to each job through its event queue as they are generated.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from slimtune.infer.generation import SamplingOptions, generate_ids
from slimtune.infer.loading import LoadedModel


class Overloaded(Exception):
    """max_queue jobs are already waiting."""


@dataclass
class Job:
    """One request's work and its channel back to the HTTP thread."""

    adapter: str | None
    """Adapter name, None for the base model."""
    prompt_ids: list[int]
    options: SamplingOptions
    stop: list[str] = field(default_factory=list)
    """Stop strings: the answer ends before the first of them."""
    events: queue.Queue = field(default_factory=queue.Queue)
    """("delta", text), then ("done", (text, finish_reason, completion_tokens)) or ("error", message)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the client went away, or a stop string ended the answer."""

    @property
    def key(self) -> tuple:
        o = self.options
        return (self.adapter, o.greedy, o.temperature, o.top_p, o.seed)


class Scheduler:
    """Owns the model; `submit` from any thread, one worker thread generates."""

    def __init__(self, loaded: LoadedModel, max_queue: int, max_batch_size: int, batch_wait_s: float) -> None:
        self.loaded = loaded
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._waiting: collections.deque[Job] = collections.deque()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batch_sizes: list[int] = []
        """Size of every batch run, in order (for tests and logs)."""

    def submit(self, job: Job) -> None:
        """Add a job to the waiting list; Overloaded when max_queue jobs already wait."""
        with self._changed:
            if len(self._waiting) >= self.max_queue:
                self._drop_cancelled()
            if len(self._waiting) >= self.max_queue:
                raise Overloaded
            self._waiting.append(job)
            self._changed.notify_all()

    def waiting(self) -> int:
        """Jobs submitted and not yet generating (every batch key counts)."""
        with self._changed:
            return len(self._waiting)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="slimtune-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch(timeout=0.1)
            if batch:
                self.batch_sizes.append(len(batch))
                self._run(batch)

    def _next_batch(self, timeout: float) -> list[Job]:
        """The oldest job and up to max_batch_size - 1 later ones of its key, waiting at most batch_wait
        for them; they leave the waiting list together."""
        with self._changed:
            self._drop_cancelled()
            if not self._waiting and not self._changed.wait(timeout):
                return []
            self._drop_cancelled()
            if not self._waiting:
                return []
            key = self._waiting[0].key
            deadline = time.monotonic() + self.batch_wait_s
            while True:
                batch = [job for job in self._waiting if job.key == key][: self.max_batch_size]
                remaining = deadline - time.monotonic()
                if len(batch) >= self.max_batch_size or remaining <= 0 or self._stop.is_set():
                    break
                self._changed.wait(remaining)
            chosen = {id(job) for job in batch}
            self._waiting = collections.deque(job for job in self._waiting if id(job) not in chosen)
        return [job for job in batch if not job.cancelled.is_set()]

    def _drop_cancelled(self) -> None:
        """Forget waiting jobs whose client has gone (caller holds the lock)."""
        if any(job.cancelled.is_set() for job in self._waiting):
            self._waiting = collections.deque(job for job in self._waiting if not job.cancelled.is_set())

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        loaded = self.loaded
        streamer = _RowStreamer(loaded.tokenizer, batch, loaded.stop_token_ids)
        try:
            results = generate_ids(loaded.model, loaded.tokenizer, [j.prompt_ids for j in batch], batch[0].options,
                                   loaded.stop_token_ids, batch[0].adapter,
                                   limits=[j.options.max_new_tokens for j in batch], streamer=streamer,
                                   cancelled=[j.cancelled for j in batch])
        except Exception as err:  # the model failed: every job of the batch learns why
            for job in batch:
                job.events.put(("error", f"generation failed: {type(err).__name__}: {err}"))
            return
        for job, result, row in zip(batch, results, streamer.rows):
            text, finish = cut_at_stop(result.text, job.stop)
            finish = finish or result.finish_reason
            tokens = len(result.token_ids) - (1 if result.finish_reason == "stop" else 0)
            if text[len(row.sent):] and text.startswith(row.sent):
                job.events.put(("delta", text[len(row.sent):]))
            job.events.put(("done", (text, finish, tokens)))


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """(text before the first stop string, "stop") or (text, None)."""
    cuts = [text.find(s) for s in stops if s in text]
    return (text[:min(cuts)], "stop") if cuts else (text, None)


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    done: bool = False


class _RowStreamer:
    """A transformers streamer for a batch: `put` gets the prompt (B, T) once, then each step's (B,) ids."""

    def __init__(self, tokenizer: Any, jobs: list[Job], stop_ids: list[int]) -> None:
        self.tokenizer, self.jobs, self.stop_ids = tokenizer, jobs, set(stop_ids)
        self.rows = [_Row() for _ in jobs]
        self._prompt_seen = False
        self._holdback = [max((len(s) for s in j.stop), default=1) - 1 for j in jobs]

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for i, token in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            self._step(i, token)

    def end(self) -> None:
        pass

    def _step(self, i: int, token: int) -> None:
        row, job = self.rows[i], self.jobs[i]
        if row.done or job.cancelled.is_set():
            return
        if token in self.stop_ids or len(row.tokens) >= job.options.max_new_tokens:
            row.done = True
            return
        row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if job.stop:
            cut, hit = cut_at_stop(text, job.stop)
            if hit:
                row.done = True
                job.cancelled.set()  # RowLimits ends this row
                return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next bytes
            return
        ready = text[: len(text) - self._holdback[i]] if job.stop else text
        if len(ready) > len(row.sent) and ready.startswith(row.sent):
            job.events.put(("delta", ready[len(row.sent):]))
            row.sent = ready
