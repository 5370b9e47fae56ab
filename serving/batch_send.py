"""Sending batch rows: to a server over HTTP, or to the CPU engine in this process through the server's ASGI app."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any

import httpx

from lorafleet.serving.batch_rows import Row
from lorafleet.serving.config import ServingConfig

RETRY_STATUSES = {429, 502, 503, 504}
MAX_ATTEMPTS = 6


class Sender:
    """POSTs request bodies to a server (or an ASGI app in this process), retrying 429/5xx and lost connections."""

    def __init__(self, base_url: str, *, api_key: str | None = None, transport: httpx.AsyncBaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=600, transport=transport)

    async def send(self, row: Row) -> tuple[int, Any]:
        delay = 0.5
        for attempt in range(MAX_ATTEMPTS):
            try:
                response = await self.http.post(row.endpoint, json=row.body)
            except httpx.TransportError as exc:
                if attempt == MAX_ATTEMPTS - 1:
                    return 599, f"cannot reach the server: {exc}"
            else:
                if response.status_code not in RETRY_STATUSES or attempt == MAX_ATTEMPTS - 1:
                    return response.status_code, _json_or_text(response)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.http.aclose()


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def error_text(payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message"))
    return str(payload)[:1000]


@asynccontextmanager
async def in_process_sender(settings: ServingConfig, concurrency: int):
    """The CPU engine started here, reached through the server's ASGI app (same validation and answers)."""
    from lorafleet.serving.app import create_app
    from lorafleet.serving.engine import CPUEngine

    settings = settings.model_copy(update={"api_key": None, "max_queue": max(settings.max_queue, concurrency)})
    engine = CPUEngine(settings)
    await asyncio.to_thread(engine.start)
    sender = Sender("http://in-process", transport=httpx.ASGITransport(app=create_app(settings, engine)))
    try:
        yield sender
    finally:
        await sender.close()
        await asyncio.to_thread(engine.shutdown)


async def answer_all(sender: Sender, rows: list[Row], concurrency: int, on_done) -> None:
    """Send every row with at most `concurrency` in flight; `on_done(row, status, payload)` as each returns."""
    gate = asyncio.Semaphore(concurrency)

    async def one(row: Row) -> None:
        async with gate:
            status, payload = await sender.send(row)
        on_done(row, status, payload)

    await asyncio.gather(*(one(row) for row in rows))
