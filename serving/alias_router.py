"""The alias router: clients ask for `price`, the server answers with the version `price` points at now, and no
adapter name on the server is ever reused for other weights.

vLLM keys its prefix-cache blocks by the adapter's *name* (`lora_name` in the block hash's extra keys, vLLM
0.33.0's `vllm/v1/core/kv_cache_utils.py`; vllm-project/vllm issue 42125): loading new weights under a name
that served old ones — in place, or by unload + load — lets later requests reuse KV computed with the old
weights. So with routing, `lorafleet sync` loads every version under a name of its own
(`price.v3-1a2b3c4d5e`: name, version and a digest of its files, fixed for ever since registry versions never
change) and the router rewrites `"model": "price"` to that name in each request before passing it on.

Each request is rewritten once, when it arrives: it runs wholly on the version the alias named then. Everything
else passes through unchanged (streams included; /health, /metrics, the API key header). `GET /v1/models` is the
server's list plus one entry per alias. Bodies are bounded like the server's own (`max_request_bytes`).
"""

from __future__ import annotations

import json
import threading
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding"}


class AliasTable:
    """alias -> the served name of its current version; written by sync, read by the router (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[str, str] = {}

    def set(self, alias: str, served: str) -> None:
        with self._lock:
            self._names = {**self._names, alias: served}

    def drop(self, alias: str) -> None:
        with self._lock:
            self._names = {key: value for key, value in self._names.items() if key != alias}

    def get(self, alias: str) -> str | None:
        return self._names.get(alias)

    def snapshot(self) -> dict[str, str]:
        return dict(self._names)


def create_router(upstream: str, table: AliasTable, *, max_request_bytes: int = 1_048_576) -> FastAPI:
    """A FastAPI app that forwards every request to `upstream`, aliases in JSON bodies' `model` resolved."""
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state["client"] = httpx.AsyncClient(base_url=upstream.rstrip("/"), timeout=httpx.Timeout(600, connect=10))
        yield
        await state["client"].aclose()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        answer = await state["client"].get("/v1/models", headers=_forwarded(request))
        if answer.status_code != 200:
            return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))
        listing = answer.json()
        cards = {card["id"]: card for card in listing.get("data", [])}
        for alias, served in table.snapshot().items():
            if served in cards and alias not in cards:
                listing["data"].append({**cards[served], "id": alias})
        return JSONResponse(listing)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def forward(path: str, request: Request) -> Response:
        body = await request.body()
        if len(body) > max_request_bytes:
            return _error(413, f"the request body is over {max_request_bytes} bytes")
        body = _resolved(body, table) if request.method == "POST" and body else body
        upstream_request = state["client"].build_request(
            request.method, f"/{path}", params=request.query_params, headers=_forwarded(request), content=body
        )
        try:
            answer = await state["client"].send(upstream_request, stream=True)
        except httpx.TransportError as exc:
            return _error(502, f"the server behind the router did not answer: {type(exc).__name__}")
        headers = {key: value for key, value in answer.headers.items() if key.lower() not in HOP_HEADERS}
        return StreamingResponse(answer.aiter_raw(), answer.status_code, headers, background=_closing(answer))

    return app


def _resolved(body: bytes, table: AliasTable) -> bytes:
    """The body with `model` rewritten when it names an alias; anything that is not a JSON object unchanged."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
        return body
    served = table.get(payload["model"])
    if served is None:
        return body
    return json.dumps({**payload, "model": served}).encode()


def _forwarded(request: Request) -> dict[str, str]:
    return {key: value for key, value in request.headers.items() if key.lower() not in HOP_HEADERS}


def _closing(answer: httpx.Response):
    from starlette.background import BackgroundTask

    return BackgroundTask(answer.aclose)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "router_error", "code": status}}, status)
