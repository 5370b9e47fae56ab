"""Server-sent events in OpenAI's chunk format (ending with `data: [DONE]`), and per-request latency metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from lorafleet.serving.metrics import ServerMetrics
from lorafleet.serving.middleware import error_body
from lorafleet.serving.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    Usage,
)
from lorafleet.serving.request_queue import Delta, RequestStream


class Observer:
    """Latency and token metrics of one request (its prompt counted once, whatever its number of choices)."""

    def __init__(self, metrics: ServerMetrics, model: str, started: float, *, choices: int = 1):
        self.metrics, self.model, self.started = metrics, model, started
        self.first_seen = False
        self.unfinished = choices

    def delta(self, delta: Delta) -> None:
        now = time.monotonic()
        if not self.first_seen and (delta.text or delta.finish_reason):
            self.first_seen = True
            self.metrics.time_to_first_token.labels(model=self.model).observe(now - self.started)
        if delta.final and delta.error is None:
            self.unfinished -= 1
            self.metrics.generation_tokens.labels(model=self.model).inc(delta.completion_tokens)
            if self.unfinished == 0:
                self.metrics.e2e_latency.labels(model=self.model).observe(now - self.started)
                self.metrics.prompt_tokens.labels(model=self.model).inc(delta.prompt_tokens)


class ChunkWriter:
    """The `data: ...` lines of one response: content chunks, the usage chunk, an error."""

    def __init__(self, response_id: str, model: str, *, chat: bool, continuous: bool):
        self.response_id, self.model, self.chat, self.continuous = response_id, model, chat, continuous
        self.created = int(time.time())

    def chunk(self, text: str | None, delta: Delta | None, *, index: int = 0, role: bool = False) -> str:
        finish = delta.finish_reason if delta else None
        stop_reason = delta.stop_reason if delta else None
        usage = Usage.of(delta.prompt_tokens, delta.completion_tokens) if (self.continuous and delta) else None
        if self.chat:
            message = DeltaMessage(role="assistant" if role else None, content=text)
            choices = [ChatChunkChoice(index=index, delta=message, finish_reason=finish, stop_reason=stop_reason)]
        else:
            choices = [CompletionChoice(index=index, text=text or "", finish_reason=finish, stop_reason=stop_reason)]
        return self._line(choices, usage)

    def usage(self, finals: list[Delta]) -> str:
        """The usage chunk after every choice finished: the prompt once, the completions of all choices."""
        completion = sum(delta.completion_tokens for delta in finals)
        return self._line([], Usage.of(finals[0].prompt_tokens, completion))

    def _line(self, choices: list, usage: Usage | None) -> str:
        shape = ChatCompletionChunk if self.chat else CompletionResponse
        body = shape(id=self.response_id, created=self.created, model=self.model, choices=choices, usage=usage)
        fields = body.model_dump(mode="json")
        # OpenAI's schemas: a completion chunk's usage and a chat delta's role/content are absent, never null.
        if usage is None and not self.chat:
            del fields["usage"]
        for choice in fields["choices"] if self.chat else ():
            choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
        return f"data: {json.dumps(fields, ensure_ascii=False, separators=(',', ':'))}\n\n"

    @staticmethod
    def error(exc: Exception) -> str:
        kind = getattr(exc, "type", "InternalServerError")
        body = error_body(str(exc), kind, getattr(exc, "param", None), getattr(exc, "code", None))
        return f"data: {json.dumps(body)}\n\n"


async def sse_events(
    streams: list[RequestStream],
    observed: Observer,
    response_id: str,
    model: str,
    *,
    chat: bool,
    include_usage: bool,
    continuous: bool,
) -> AsyncIterator[str]:
    """The chunks of every choice as they come (each carries its `index`), one usage chunk, then [DONE]."""
    writer = ChunkWriter(response_id, model, chat=chat, continuous=continuous)
    finals: list[Delta] = []
    try:
        if chat:
            for index in range(len(streams)):
                yield writer.chunk("", None, index=index, role=True)
        async for index, delta in interleaved(streams):
            observed.delta(delta)
            if delta.error is not None:
                yield writer.error(delta.error)
                break
            if delta.text or delta.finish_reason:
                yield writer.chunk(delta.text, delta, index=index)
            if delta.finish_reason:
                finals.append(delta)
        else:
            if include_usage:
                yield writer.usage(finals)
        yield "data: [DONE]\n\n"
    finally:
        for stream in streams:
            stream.cancel()


async def interleaved(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from every stream in the order they arrive, until each has given its last."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    arrived: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()

    async def forward(index: int, stream: RequestStream) -> None:
        async for delta in stream:
            arrived.put_nowait((index, delta))

    tasks = [asyncio.ensure_future(forward(index, stream)) for index, stream in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while True:
                index, delta = await arrived.get()
                yield index, delta
                if delta.final:
                    break
    finally:
        for task in tasks:
            task.cancel()
