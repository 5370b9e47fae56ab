"""The OpenAI-compatible API in front of the CPU engine, with vLLM's routes, shapes and error contract.

    app = create_app(ServingConfig(base="builtin:tiny-llama", adapters={"a": "/adapters/a"}))
    uvicorn.run(app)        # or serving.server.ServerThread(app).start() in tests

Routes: GET / (the playground page, serving/static/index.html), GET /health, GET /metrics, GET /v1/models,
POST /v1/completions, POST /v1/chat/completions (stream or not), POST /v1/load_lora_adapter,
POST /v1/unload_lora_adapter. Errors are `{"error": {message, type, param, code}}`: 400 invalid input (the field
is named), 401 API key, 404 unknown model/adapter, 413 body too large, 429 queue full (with Retry-After), 503
shutting down.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lorafleet.serving.adapters import AdapterError
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.engine import CPUEngine, GenerationRequest, UnknownModel
from lorafleet.serving.metrics import ServerMetrics
from lorafleet.serving.middleware import ApiKey, BodyLimit, RequestMetrics, error_body
from lorafleet.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoraAdapterRequest,
    Unsupported,
    Usage,
)
from lorafleet.serving.request_queue import Delta, QueueFull, RequestStream, ServingError
from lorafleet.serving.sampling import SamplingParams

ROUTES = {
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
}
RETRY_AFTER_S = 1
# The playground is self-contained: the browser refuses anything not inline or from this server.
DEMO_PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class BadRequest(ServingError):
    status = 400
    type = "BadRequestError"


def create_app(config: ServingConfig, engine: CPUEngine | None = None) -> FastAPI:
    """The API app; starts `engine` (a new CPUEngine by default) on startup unless it runs already."""
    engine = engine or CPUEngine(config)
    metrics = ServerMetrics(engine.stats)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if not engine.running:
            await asyncio.to_thread(engine.start)
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="lorafleet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    if config.api_key:
        app.add_middleware(ApiKey, key=config.api_key)
    app.add_middleware(RequestMetrics, metrics=metrics, routes=ROUTES)
    _error_handlers(app)

    @app.get("/")
    async def demo_page() -> Response:
        return HTMLResponse(_demo_page(), headers={"Content-Security-Policy": DEMO_PAGE_CSP})

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.running else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> ModelList:
        cards = [ModelCard(id=config.model_id, root=config.base, max_model_len=engine.max_model_len)]
        cards += [
            ModelCard(id=a.name, root=str(a.spec.path), parent=config.model_id, created=a.created)
            for a in engine.adapters()
        ]
        return ModelList(data=cards)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt_value
        if isinstance(prompt, str):
            prompt_ids = engine.tokenizer(prompt).input_ids
        else:
            if any(not 0 <= token < engine.vocab_size for token in prompt):
                raise BadRequest(f"prompt token ids must be in [0, {engine.vocab_size})", param="prompt")
            prompt_ids = list(prompt)
        return await _generate(request, body, prompt_ids, "prompt", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if not getattr(engine.tokenizer, "chat_template", None):
            raise BadRequest("the base model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            text = engine.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=body.add_generation_prompt
            )
        except Exception as exc:  # the template's own checks (e.g. roles must alternate)
            raise BadRequest(f"the chat template rejected the messages: {exc}", param="messages") from None
        prompt_ids = engine.tokenizer(text, add_special_tokens=False).input_ids
        return await _generate(request, body, prompt_ids, "messages", chat=True)

    async def _generate(request: Request, body, prompt_ids: list[int], prompt_field: str, *, chat: bool):
        try:
            body.unsupported()
        except Unsupported as exc:
            raise BadRequest(str(exc), param=exc.param) from None
        if not engine.has_model(body.model):
            raise UnknownModel(body.model)
        request.state.model = body.model
        params = _sampling_params(body, len(prompt_ids), prompt_field, chat=chat)
        started = time.monotonic()
        try:
            stream = engine.submit(GenerationRequest(prompt_ids, body.model, params), asyncio.get_running_loop())
        except QueueFull:
            metrics.rejected.labels(reason="queue_full").inc()
            raise
        except ServingError as exc:
            if exc.status == 503:
                metrics.rejected.labels(reason="shutting_down").inc()
            raise
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        observed = _Observer(metrics, body.model, started)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
            events = _sse(stream, observed, response_id, body.model, chat, include_usage, continuous)
            return StreamingResponse(events, media_type="text/event-stream")
        text, last = [], Delta()
        try:
            async for delta in stream:
                observed.delta(delta)
                if delta.error is not None:
                    raise delta.error
                text.append(delta.text)
                last = delta
        finally:
            stream.cancel()  # a no-op when finished; frees the slot if the client went away
        usage = Usage.of(last.prompt_tokens, last.completion_tokens)
        created = int(time.time())
        if chat:
            choice = ChatChoice(
                message=AssistantMessage(content="".join(text)),
                finish_reason=last.finish_reason,
                stop_reason=last.stop_reason,
            )
            result = ChatCompletionResponse(
                id=response_id, created=created, model=body.model, choices=[choice], usage=usage
            )
        else:
            choice = CompletionChoice(
                text="".join(text), finish_reason=last.finish_reason, stop_reason=last.stop_reason
            )
            result = CompletionResponse(
                id=response_id, created=created, model=body.model, choices=[choice], usage=usage
            )
        return JSONResponse(result.model_dump(mode="json"))

    def _sampling_params(body, prompt_len: int, prompt_field: str, *, chat: bool) -> SamplingParams:
        limit = engine.max_model_len
        if prompt_len == 0:
            raise BadRequest("the prompt is empty", param=prompt_field)
        if prompt_len >= limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {prompt_len} "
                "tokens. Please reduce the length of the prompt.",
                param=prompt_field,
            )
        wanted = body.token_limit if chat else body.max_tokens
        field = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        if wanted is not None and wanted > config.max_tokens:
            raise BadRequest(f"{field} {wanted} is above this server's cap of {config.max_tokens}", param=field)
        if wanted is not None and prompt_len + wanted > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + wanted} tokens ({prompt_len} in the {prompt_field}, {wanted} in the completion). "
                f"Please reduce the length of the {prompt_field} or the completion.",
                param=field,
            )
        max_tokens = wanted if wanted is not None else min(config.max_tokens, limit - prompt_len)
        top_k = body.top_k if body.top_k and body.top_k > 0 else 0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=top_k,
            seed=body.seed,
            stop=tuple(body.stop_list),
            ignore_eos=body.ignore_eos,
        )

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> Response:
        _runtime_updates_on()
        await engine.load_adapter(body.lora_name, body.lora_path, replace=body.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> Response:
        _runtime_updates_on()
        await engine.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def _runtime_updates_on() -> None:
        if not config.runtime_lora_updating:
            raise HTTPException(404, "runtime LoRA updating is off (runtime_lora_updating: false)")

    return app


@cache
def _demo_page() -> str:
    return resources.files("serving").joinpath("static/index.html").read_text(encoding="utf-8")


class _Observer:
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


async def _sse(
    stream: RequestStream,
    observed: _Observer,
    response_id: str,
    model: str,
    chat: bool,
    include_usage: bool,
    continuous: bool,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    created = int(time.time())

    def chunk(text: str | None, delta: Delta | None, *, role: bool = False) -> str:
        finish = delta.finish_reason if delta else None
        stop_reason = delta.stop_reason if delta else None
        usage = Usage.of(delta.prompt_tokens, delta.completion_tokens) if (continuous and delta) else None
        if chat:
            message = DeltaMessage(role="assistant" if role else None, content=text)
            choice = ChatChunkChoice(delta=message, finish_reason=finish, stop_reason=stop_reason)
            body = ChatCompletionChunk(id=response_id, created=created, model=model, choices=[choice], usage=usage)
        else:
            choice = CompletionChoice(text=text or "", finish_reason=finish, stop_reason=stop_reason)
            body = CompletionResponse(id=response_id, created=created, model=model, choices=[choice], usage=usage)
        return f"data: {body.model_dump_json()}\n\n"

    try:
        if chat:
            yield chunk("", None, role=True)
        async for delta in stream:
            observed.delta(delta)
            if delta.error is not None:
                status = getattr(delta.error, "status", 500)
                kind = getattr(delta.error, "type", "InternalServerError")
                yield f"data: {json.dumps(error_body(str(delta.error), kind, status))}\n\n"
                break
            if delta.text or delta.finish_reason:
                yield chunk(delta.text, delta)
            if delta.finish_reason and include_usage:
                usage = Usage.of(delta.prompt_tokens, delta.completion_tokens)
                if chat:
                    body = ChatCompletionChunk(id=response_id, created=created, model=model, choices=[], usage=usage)
                else:
                    body = CompletionResponse(id=response_id, created=created, model=model, choices=[], usage=usage)
                yield f"data: {body.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()


def _error_handlers(app: FastAPI) -> None:
    def respond(status: int, message: str, type_: str, param: str | None = None, headers=None) -> JSONResponse:
        return JSONResponse(error_body(message, type_, status, param), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        messages, param = [], None
        for error in exc.errors():
            loc = [str(part) for part in error.get("loc", ()) if part != "body"]
            field = ".".join(loc)
            if error.get("type") == "json_invalid":
                messages.append(f"the body is not valid JSON: {error.get('ctx', {}).get('error', 'decode error')}")
                continue
            param = param or (loc[0] if loc else None)
            if error.get("type") == "extra_forbidden":
                messages.append(f"Unrecognized request argument supplied: {field}")
            else:
                messages.append(f"{field or 'body'}: {error.get('msg')}")
        return respond(400, "; ".join(messages) or "invalid request", "BadRequestError", param)

    @app.exception_handler(ServingError)
    async def serving_error(_: Request, exc: ServingError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status in (429, 503) else None
        return respond(exc.status, str(exc), exc.type, exc.param, headers)

    @app.exception_handler(AdapterError)
    async def adapter_error(_: Request, exc: AdapterError) -> JSONResponse:
        type_ = "NotFoundError" if exc.status == 404 else "BadRequestError"
        return respond(exc.status, str(exc), type_, exc.param)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        type_ = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code, "BadRequestError")
        return respond(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        return respond(500, f"internal error: {type(exc).__name__}: {exc}", "InternalServerError")
