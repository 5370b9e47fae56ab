"""ASGI middleware of the API server: request metrics, API key, body size limit (outermost first)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafleet.serving.metrics import ServerMetrics
from lorafleet.serving.protocol import ErrorBody, ErrorResponse

# The playground page is static and holds no data; it asks the user for the key and sends it on its API calls.
UNAUTHENTICATED_PATHS = ("/", "/health")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}}; `code` is a string or null."""
    return ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code)).model_dump()


async def send_error(
    send: Send, status: int, message: str, type_: str, headers: dict[str, str] | None = None, code: str | None = None
) -> None:
    body = json.dumps(error_body(message, type_, code=code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Count every request by route, status and model (`scope["state"]["model"]`, set by the handlers)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            model = scope.get("state", {}).get("model") or "none"
            self.metrics.requests.labels(route=route, status=str(status["code"]), model=model).inc()


class ApiKey:
    """`Authorization: Bearer <key>` on every route but / and /health (401 otherwise)."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self.digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNAUTHENTICATED_PATHS or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, self.digest):
            await send_error(
                send,
                401,
                "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                "AuthenticationError",
                {"WWW-Authenticate": "Bearer"},
                code="invalid_api_key",
            )
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, whether announced by Content-Length or streamed (chunked); a
    body that is not JSON by its Content-Type with 415 naming it; a body still incomplete after `timeout_s`
    (a slow client holding a connection) with 408.

    The body is read here (it is small by construction) and replayed to the app.
    """

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float = 30.0):
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        message_too_large = f"The request body is larger than this server accepts ({self.limit} bytes)."
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await send_error(send, 413, message_too_large, "RequestTooLargeError")
            return
        media_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
        if scope["path"].startswith("/v1/") and media_type != "application/json":
            shown = f"Content-Type {media_type!r}" if media_type else "no Content-Type"
            message = f"The request body must be JSON, sent with Content-Type: application/json (got {shown})."
            await send_error(send, 415, message, "UnsupportedMediaTypeError")
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                message = f"The request body did not arrive within {self.timeout_s:g}s."
                await send_error(send, 408, message, "RequestTimeoutError", {"Connection": "close"})
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_error(send, 413, message_too_large, "RequestTooLargeError")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
