"""What completions and chat share: checks before a request is queued, its sampling parameters, the response."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lorafleet.serving.config import ServingConfig
from lorafleet.serving.engine_api import Engine, GenerationRequest, UnknownModel
from lorafleet.serving.handlers.streaming import Observer, sse_events
from lorafleet.serving.metrics import ServerMetrics
from lorafleet.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    Unsupported,
    Usage,
)
from lorafleet.serving.request_queue import Delta, QueueFull, RequestStream, ServingError
from lorafleet.serving.sampling import SamplingParams

CLIENT_CLOSED = 499  # nginx's code for "client closed the request"; never reaches the client


class BadRequest(ServingError):
    status = 400
    type = "BadRequestError"


class GenerationHandler:
    chat: bool
    prompt_field: str

    def __init__(self, config: ServingConfig, engine: Engine, metrics: ServerMetrics):
        self.config = config
        self.engine = engine
        self.metrics = metrics

    async def generate(self, request: Request, body, prompt_ids: list[int]) -> Response:
        try:
            body.unsupported()
        except Unsupported as exc:
            raise BadRequest(str(exc), param=exc.param) from None
        if not self.engine.has_model(body.model):
            raise UnknownModel(body.model)
        request.state.model = body.model
        params = self.sampling_params(body, len(prompt_ids))
        self.check_choices(body.n)
        started = time.monotonic()
        streams = self._submit(GenerationRequest(prompt_ids, body.model, params), body.n)
        response_id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        observed = Observer(self.metrics, body.model, started, choices=body.n)
        if body.stream:
            options = body.stream_options
            events = sse_events(
                streams,
                observed,
                response_id,
                body.model,
                chat=self.chat,
                include_usage=bool(options and options.include_usage),
                continuous=bool(options and options.continuous_usage_stats),
            )
            return StreamingResponse(events, media_type="text/event-stream")
        collected = await self._collect_while_connected(request, streams, observed)
        if collected is None:
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the batch slots are already free
        return JSONResponse(self._response(response_id, body.model, collected).model_dump(mode="json"))

    def check_choices(self, n: int) -> None:
        """`n` choices take n batch slots at once: at most `max_n`, and never more than a batch holds."""
        limit = min(self.config.max_n, self.engine.max_batch_size)
        if n > limit:
            raise BadRequest(f"n {n} is above this server's limit of {limit} choices per request", param="n")

    def _submit(self, request: GenerationRequest, n: int) -> list[RequestStream]:
        try:
            return self.engine.submit_choices(request, n, asyncio.get_running_loop())
        except QueueFull:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise
        except ServingError as exc:
            if exc.status == 503:
                self.metrics.rejected.labels(reason="shutting_down").inc()
            raise

    async def _collect_while_connected(
        self, request: Request, streams: list[RequestStream], observed: Observer
    ) -> list[tuple[str, Delta]] | None:
        """Every choice's whole answer, or None as soon as the client disconnects (the sequences are cancelled)."""
        collecting = asyncio.ensure_future(asyncio.gather(*(_collect(stream, observed) for stream in streams)))
        watching = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            for stream in streams:
                stream.cancel()  # a no-op when finished; frees the slot if the client went away or a choice failed
        if not collecting.done():
            collecting.cancel()
            return None
        return collecting.result()

    def _response(self, response_id: str, model: str, answers: list[tuple[str, Delta]]):
        usage = Usage.of(answers[0][1].prompt_tokens, sum(last.completion_tokens for _, last in answers))
        created = int(time.time())
        if self.chat:
            choices = [
                ChatChoice(
                    index=index,
                    message=AssistantMessage(content=text),
                    finish_reason=last.finish_reason,
                    stop_reason=last.stop_reason,
                )
                for index, (text, last) in enumerate(answers)
            ]
            return ChatCompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=usage)
        choices = [
            CompletionChoice(index=index, text=text, finish_reason=last.finish_reason, stop_reason=last.stop_reason)
            for index, (text, last) in enumerate(answers)
        ]
        return CompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=usage)

    def sampling_params(self, body, prompt_len: int) -> SamplingParams:
        limit, prompt_field, cap = self.engine.max_model_len, self.prompt_field, self.config.max_tokens
        if prompt_len == 0:
            raise BadRequest("the prompt is empty", param=prompt_field)
        if prompt_len >= limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {prompt_len} "
                "tokens. Please reduce the length of the prompt.",
                param=prompt_field,
            )
        wanted = body.token_limit if self.chat else body.max_tokens
        field = "max_completion_tokens" if self.chat and body.max_completion_tokens is not None else "max_tokens"
        if wanted is not None and wanted > cap:
            raise BadRequest(f"{field} {wanted} is above this server's cap of {cap}", param=field)
        if wanted is not None and prompt_len + wanted > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + wanted} tokens ({prompt_len} in the {prompt_field}, {wanted} in the completion). "
                f"Please reduce the length of the {prompt_field} or the completion.",
                param=field,
            )
        return SamplingParams(
            max_tokens=wanted if wanted is not None else min(cap, limit - prompt_len),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k if body.top_k and body.top_k > 0 else 0,
            seed=body.seed,
            stop=tuple(body.stop_list),
            ignore_eos=body.ignore_eos,
        )


async def _collect(stream: RequestStream, observed: Observer) -> tuple[str, Delta]:
    text, last = [], Delta()
    async for delta in stream:
        observed.delta(delta)
        if delta.error is not None:
            raise delta.error
        text.append(delta.text)
        last = delta
    return "".join(text), last


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body was read already, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
