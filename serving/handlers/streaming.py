"""Server-sent events in OpenAI's chunk format (ending with `data: [DONE]`), and per-request latency metrics."""

from __future__ import annotations

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
    """Latency and token metrics of one generation."""

    def __init__(self, metrics: ServerMetrics, model: str, started: float):
        self.metrics, self.model, self.started = metrics, model, started
        self.first_seen = False

    def delta(self, delta: Delta) -> None:
        now = time.monotonic()
        if not self.first_seen and (delta.text or delta.finish_reason):
            self.first_seen = True
            self.metrics.time_to_first_token.labels(model=self.model).observe(now - self.started)
        if delta.final and delta.error is None:
            self.metrics.e2e_latency.labels(model=self.model).observe(now - self.started)
            self.metrics.prompt_tokens.labels(model=self.model).inc(delta.prompt_tokens)
            self.metrics.generation_tokens.labels(model=self.model).inc(delta.completion_tokens)


class ChunkWriter:
    """The `data: ...` lines of one response: content chunks, the usage chunk, an error."""

    def __init__(self, response_id: str, model: str, *, chat: bool, continuous: bool):
        self.response_id, self.model, self.chat, self.continuous = response_id, model, chat, continuous
        self.created = int(time.time())

    def chunk(self, text: str | None, delta: Delta | None, *, role: bool = False) -> str:
        finish = delta.finish_reason if delta else None
        stop_reason = delta.stop_reason if delta else None
        usage = Usage.of(delta.prompt_tokens, delta.completion_tokens) if (self.continuous and delta) else None
        if self.chat:
            message = DeltaMessage(role="assistant" if role else None, content=text)
            choices = [ChatChunkChoice(delta=message, finish_reason=finish, stop_reason=stop_reason)]
        else:
            choices = [CompletionChoice(text=text or "", finish_reason=finish, stop_reason=stop_reason)]
        return self._line(choices, usage)

    def usage(self, delta: Delta) -> str:
        return self._line([], Usage.of(delta.prompt_tokens, delta.completion_tokens))

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
    stream: RequestStream,
    observed: Observer,
    response_id: str,
    model: str,
    *,
    chat: bool,
    include_usage: bool,
    continuous: bool,
) -> AsyncIterator[str]:
    writer = ChunkWriter(response_id, model, chat=chat, continuous=continuous)
    try:
        if chat:
            yield writer.chunk("", None, role=True)
        async for delta in stream:
            observed.delta(delta)
            if delta.error is not None:
                yield writer.error(delta.error)
                break
            if delta.text or delta.finish_reason:
                yield writer.chunk(delta.text, delta)
            if delta.finish_reason and include_usage:
                yield writer.usage(delta)
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()
