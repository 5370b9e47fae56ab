"""Every error as OpenAI's `{"error": {message, type, param, code}}`, with the status vLLM gives it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lorafleet.serving.adapters import AdapterError
from lorafleet.serving.middleware import error_body
from lorafleet.serving.request_queue import ServingError

RETRY_AFTER_S = 1


def install_error_handlers(app: FastAPI) -> None:
    def respond(
        status: int, message: str, type_: str, param: str | None = None, headers=None, code: str | None = None
    ) -> JSONResponse:
        return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)

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
        return respond(exc.status, str(exc), exc.type, exc.param, headers, exc.code)

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
