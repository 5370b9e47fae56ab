"""The OpenAI-compatible API in front of an engine, with vLLM's routes, shapes and error contract.

    app = create_app(ServingConfig(base="builtin:tiny-llama", adapters={"a": "/adapters/a"}))
    uvicorn.run(app)        # or serving.server.ServerThread(app).start() in tests

Routes: GET / (the playground page, serving/static/index.html), GET /health, GET /metrics, GET /v1/models,
POST /v1/completions, POST /v1/chat/completions (stream or not), POST /v1/load_lora_adapter,
POST /v1/unload_lora_adapter. Errors are `{"error": {message, type, param, code}}`: 400 invalid input (the field
is named), 401 API key, 404 unknown model/adapter, 413 body too large, 429 queue full (with Retry-After), 503
shutting down. Each route is one line over its handler (`serving.handlers`).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from lorafleet.serving.config import ServingConfig
from lorafleet.serving.engine_api import Engine
from lorafleet.serving.handlers.adapters import AdaptersHandler
from lorafleet.serving.handlers.chat import ChatHandler
from lorafleet.serving.handlers.completions import CompletionsHandler
from lorafleet.serving.handlers.errors import install_error_handlers
from lorafleet.serving.handlers.models import ModelsHandler
from lorafleet.serving.metrics import ServerMetrics
from lorafleet.serving.middleware import ApiKey, BodyLimit, RequestMetrics
from lorafleet.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    ModelList,
    UnloadLoraAdapterRequest,
)

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
# The playground is self-contained: the browser refuses anything not inline or from this server.
DEMO_PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def create_app(config: ServingConfig, engine: Engine | None = None) -> FastAPI:
    """The API app; starts `engine` (a new CPUEngine by default) on startup unless it runs already."""
    if engine is None:
        from lorafleet.serving.engine import CPUEngine

        engine = CPUEngine(config)
    metrics = ServerMetrics(engine.stats)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if not engine.running:
            await asyncio.to_thread(engine.start)
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="lorafleet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.add_middleware(BodyLimit, limit=config.max_request_bytes, timeout_s=config.request_body_timeout_s)
    if config.api_key:
        app.add_middleware(ApiKey, key=config.api_key)
    app.add_middleware(RequestMetrics, metrics=metrics, routes=ROUTES)
    install_error_handlers(app)
    _add_routes(app, config, engine, metrics)
    return app


def _add_routes(app: FastAPI, config: ServingConfig, engine: Engine, metrics: ServerMetrics) -> None:
    models = ModelsHandler(config, engine)
    completions = CompletionsHandler(config, engine, metrics)
    chat = ChatHandler(config, engine, metrics)
    adapters = AdaptersHandler(config, engine)

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
    async def list_models() -> ModelList:
        return models.list()

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completions.create(body, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat.create(body, request)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> Response:
        return await adapters.load(body)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> Response:
        return await adapters.unload(body)


@cache
def _demo_page() -> str:
    return resources.files("lorafleet.serving").joinpath("static/index.html").read_text(encoding="utf-8")
