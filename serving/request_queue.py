"""The hand-off between the asyncio server and the model thread: a bounded queue and per-request streams.

    server (asyncio)                       model thread
    stream = queue.submit(request)    ──►  queue.take(free_slots, ...)     every decode step (iteration-level)
    async for delta in stream         ◄──  stream.push(delta)              via loop.call_soon_threadsafe

`submit` never blocks: a full queue raises `QueueFull` (429) and a closed one `EngineStopped` (503). When the
model thread is idle, `take` waits for the first request, then up to `max_wait_s` for more to fill the batch;
while a batch runs, newcomers join at the next step without waiting.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from lorafleet.errors import LorafleetError


class ServingError(LorafleetError):
    """An error the API turns into an OpenAI-shaped response with `status`."""

    status = 500
    type = "InternalServerError"
    code: str | None = None  # OpenAI's machine-readable code, where it defines one
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(ServingError):
    status = 429
    type = "RateLimitError"


class EngineStopped(ServingError):
    status = 503
    type = "ServiceUnavailableError"


@dataclass
class Delta:
    """What one decode step produced for one request; the last one has `finish_reason` (or `error`)."""

    text: str = ""
    new_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class RequestStream:
    """One request as the server sees it: iterate its deltas; `cancel()` when the client goes away."""

    request: Any
    loop: asyncio.AbstractEventLoop
    submitted_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def push(self, delta: Delta) -> None:
        """Called from the model thread (one wake-up per delta; `deliver` batches a step's deltas)."""
        deliver([(self, delta)])

    def _put(self, delta: Delta) -> None:
        self._queue.put_nowait(delta)

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while True:
            delta = await self._queue.get()
            yield delta
            if delta.final:
                return


def deliver(deltas: list[tuple[RequestStream, Delta]]) -> None:
    """Hand deltas to their streams with one wake-up per event loop (called from the model thread)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Delta]]] = {}
    for stream, delta in deltas:
        by_loop.setdefault(stream.loop, []).append((stream, delta))
    for loop, items in by_loop.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[RequestStream, Delta]]) -> None:
    for stream, delta in items:
        stream._put(delta)


class RequestQueue:
    """Requests waiting for a batch slot: bounded, cancel-aware, and woken by `poke` for commands."""

    def __init__(self, max_queue: int, max_wait_s: float):
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self._waiting: deque[RequestStream] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._poked = False

    def submit(self, *streams: RequestStream) -> None:
        """Queue these streams together, next to each other (the n choices of one request), or none of them."""
        with self._cond:
            if self._closed:
                raise EngineStopped("the server is shutting down; retry on another replica")
            if len(self._waiting) + len(streams) > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            self._waiting.extend(streams)
            self._cond.notify_all()

    def take(
        self, limit: int, *, idle: bool, admit: Callable[[RequestStream], bool]
    ) -> tuple[list[RequestStream], list[RequestStream]]:
        """(up to `limit` waiting requests that `admit` accepts, oldest first; the cancelled ones, removed).

        The choices of one request (one `family`) are taken, kept or dropped together, so they share one prefill.
        `idle`: nothing is running, so block until a request arrives (or `poke`), then give the batch
        `max_wait_s` to fill.
        """
        with self._cond:
            if idle:
                while not self._waiting and not self._poked and not self._closed:
                    self._cond.wait()
                deadline = time.monotonic() + self.max_wait_s
                while len(self._waiting) < limit and not self._poked and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            self._poked = False
            taken: list[RequestStream] = []
            dropped: list[RequestStream] = []
            kept: deque[RequestStream] = deque()
            while self._waiting:
                group = self._pop_family()
                if any(stream.cancelled for stream in group):
                    dropped.extend(group)
                elif len(taken) + len(group) <= limit and admit(group[0]):
                    taken.extend(group)
                else:
                    kept.extend(group)
            self._waiting = kept
            return taken, dropped

    def _pop_family(self) -> list[RequestStream]:
        """The oldest waiting stream and the siblings queued right after it (its request's other choices)."""
        group = [self._waiting.popleft()]
        family = getattr(group[0].request, "family", None)
        if family is not None:
            while len(group) < family.size and self._waiting and self._waiting[0].request.family is family:
                group.append(self._waiting.popleft())
        return group

    def poke(self) -> None:
        """Wake an idle `take` (a command or shutdown is waiting for the model thread)."""
        with self._cond:
            self._poked = True
            self._cond.notify_all()

    def close(self) -> None:
        """Refuse new requests from now on; those already waiting still run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drop_all(self) -> list[RequestStream]:
        with self._cond:
            dropped, self._waiting = list(self._waiting), deque()
            return dropped

    @property
    def closed(self) -> bool:
        return self._closed

    def depth(self) -> int:
        return len(self._waiting)
