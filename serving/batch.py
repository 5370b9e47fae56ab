"""Offline batch inference: a JSONL file of OpenAI request bodies in, one JSONL row per answered request out.

    lorafleet batch requests.jsonl --out answers.jsonl --base builtin:tiny-llama --adapter a=/adapters/a
    lorafleet batch requests.jsonl --out answers.jsonl --server http://127.0.0.1:8000 --concurrency 16
    lorafleet batch requests.jsonl --out answers.jsonl --ray auto --actors 4 --storage /mnt/x --adapters price@prod

Input rows (one JSON object a line; blank lines are skipped; `custom_id` or `id` is carried to the output):
    {"custom_id": "r1", "model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}
    {"id": "r2", "prompt": "Hello", "max_tokens": 16}                    (no model: --model's)
    {"custom_id": "r3", "method": "POST", "url": "/v1/chat/completions", "body": {...}}    (OpenAI Batch API line)
Output rows (completion order; `line` is the input's 1-based line number):
    {"line": 1, "custom_id": "r1", "model": "a", "response": {...the OpenAI response body...}}
Failed rows go to `<OUTPUT>.errors.jsonl`, never dropped: {"line": 2, "custom_id": "r2", "status": 404, "error": ...}.

Where requests run: the CPU engine in this process (default; requests go through the server's own ASGI app,
without a socket, so answers equal the server's), a running server (`--server`, ours or vLLM, at most
`concurrency` requests in flight), or Ray Data (`--ray`: `map_batches` over actors that each build the engine once).

Resume: a rerun skips rows already in OUTPUT (by `custom_id` when rows have one, else by line number). Each row
is appended with flush + fsync; a torn last line left by a crash is cut off before anything is appended. The
errors file is rewritten by every run, since its rows are tried again.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.errors import LorafleetError
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.protocol import ChatCompletionRequest, CompletionRequest

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
RETRY_STATUSES = {429, 502, 503, 504}
MAX_ATTEMPTS = 6


class BatchFailed(LorafleetError):
    """Some rows failed; they are listed, with line numbers and reasons, in the errors file."""

    exit_code = 1


class BatchJob(BaseModel):
    """One `lorafleet batch` run."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    input: Path
    output: Path
    model: str | None = Field(None, description="Model of rows that name none.")
    server: str | None = Field(None, description="Send to this server instead of the in-process engine.")
    api_key: str | None = None
    concurrency: int = Field(8, ge=1, description="Requests in flight (per engine / actor).")
    ray: str | None = Field(None, description="Ray address (`auto`, `local`, `ray://...`): run on Ray Data.")
    actors: int = Field(1, ge=1, description="Ray actors, each with its own engine.")
    settings: ServingConfig | None = Field(None, description="The in-process engine's base and adapters.")
    progress: bool = True

    @property
    def errors_path(self) -> Path:
        return self.output.with_name(self.output.name.removesuffix(".jsonl") + ".errors.jsonl")


@dataclass(frozen=True)
class Row:
    line: int
    custom_id: str | None
    endpoint: str
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return self.body["model"]


@dataclass(frozen=True)
class RowError:
    line: int
    custom_id: str | None
    status: int
    error: str

    def record(self) -> dict[str, Any]:
        return {"line": self.line, "custom_id": self.custom_id, "status": self.status, "error": self.error}


@dataclass
class BatchSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    errors_path: Path | None = None

    def line(self) -> str:
        text = f"{self.ok} ok, {self.failed} failed"
        if self.failed:
            text += f" (see {self.errors_path})"
        return text + (f", {self.skipped} already done" if self.skipped else "")


# ---- reading the input ---------------------------------------------------------------------------------------


def read_rows(path: Path, default_model: str | None) -> Iterator[Row | RowError]:
    """Every non-blank line as a validated Row, or a RowError saying what is wrong with it."""
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            row = parse_row(number, text, default_model)
            if isinstance(row, Row) and row.custom_id is not None:
                if row.custom_id in seen:
                    yield RowError(
                        number, row.custom_id, 400, f"custom_id {row.custom_id!r} is also on line {seen[row.custom_id]}"
                    )
                    continue
                seen[row.custom_id] = number
            yield row


def parse_row(number: int, text: str, default_model: str | None) -> Row | RowError:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return RowError(number, None, 400, f"invalid JSON: {exc}")
    if not isinstance(data, dict):
        return RowError(number, None, 400, "a row must be a JSON object")
    custom_id = data.pop("custom_id", None)
    row_id = data.pop("id", None)
    custom_id = custom_id if custom_id is not None else row_id
    if custom_id is not None and not isinstance(custom_id, str | int):
        return RowError(number, None, 400, "custom_id/id must be a string or an integer")
    custom_id = None if custom_id is None else str(custom_id)

    def bad(message: str) -> RowError:
        return RowError(number, custom_id, 400, message)

    body, endpoint = data, None
    if "body" in data:  # an OpenAI Batch API line
        unknown = set(data) - {"body", "url", "method"}
        if unknown:
            return bad(f"unknown key(s) beside body: {', '.join(sorted(unknown))}")
        if data.get("method", "POST") != "POST" or data.get("url") not in (CHAT, COMPLETIONS):
            return bad(f"url must be {CHAT} or {COMPLETIONS} (method POST)")
        body, endpoint = data["body"], data["url"]
        if not isinstance(body, dict):
            return bad("body must be a JSON object")
    endpoint = endpoint or (CHAT if "messages" in body else COMPLETIONS if "prompt" in body else None)
    if endpoint is None:
        return bad("a row needs `messages` (chat completion) or `prompt` (completion)")
    if "model" not in body:
        if not default_model:
            return bad("no model: set `model` in the row or pass --model")
        body = {**body, "model": default_model}
    if body.get("stream"):
        return bad("stream: true is not supported in batch (each answer is written whole)")
    schema = ChatCompletionRequest if endpoint == CHAT else CompletionRequest
    try:
        schema.model_validate(body)
    except ValidationError as exc:
        return bad("; ".join(_field_error(error) for error in exc.errors()))
    return Row(number, custom_id, endpoint, body)


def _field_error(error: dict) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "body"
    if error["type"] == "extra_forbidden":
        return f"{field}: unknown field"
    return f"{field}: {error['msg'].removeprefix('Value error, ')}"


# ---- the output files ----------------------------------------------------------------------------------------


class JsonlAppender:
    """Appends one JSON row at a time, flushed and fsynced, so a crash never leaves half a row."""

    def __init__(self, path: Path, *, truncate: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "w" if truncate else "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def append(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def finished_rows(path: Path) -> tuple[set[int], set[str]]:
    """Line numbers and custom_ids already answered in `path`; a torn last line (a crash) is cut off."""
    lines: set[int] = set()
    ids: set[str] = set()
    if not path.is_file():
        return lines, ids
    keep = 0
    with open(path, "rb") as handle:
        for raw in handle:
            try:
                record = json.loads(raw) if raw.endswith(b"\n") else None
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or "line" not in record:
                break  # only the last line can be torn: appends are whole rows, each fsynced
            keep += len(raw)
            lines.add(int(record["line"]))
            if record.get("custom_id") is not None:
                ids.add(str(record["custom_id"]))
    if keep != path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
    return lines, ids


def output_record(row: Row, response: dict[str, Any]) -> dict[str, Any]:
    return {"line": row.line, "custom_id": row.custom_id, "model": row.model, "response": response}


# ---- sending requests ----------------------------------------------------------------------------------------


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


# ---- the job -------------------------------------------------------------------------------------------------


def run_batch(job: BatchJob) -> BatchSummary:
    """Answer every row of `job.input` not yet in `job.output`; failures go to the errors file."""
    from tqdm import tqdm

    done_lines, done_ids = finished_rows(job.output)
    summary = BatchSummary(errors_path=job.errors_path)
    todo: list[Row] = []
    out = JsonlAppender(job.output)
    errors = JsonlAppender(job.errors_path, truncate=True)
    try:
        for row in read_rows(job.input, job.model):
            if (row.custom_id in done_ids) if row.custom_id is not None else (row.line in done_lines):
                summary.skipped += 1
            elif isinstance(row, RowError):
                errors.append(row.record())
                summary.failed += 1
            else:
                todo.append(row)
        bar = tqdm(total=len(todo), unit="row", desc="batch", disable=not job.progress or not todo)

        def on_done(row: Row, status: int, payload: Any) -> None:
            if status == 200 and isinstance(payload, dict):
                out.append(output_record(row, payload))
                summary.ok += 1
            else:
                errors.append(RowError(row.line, row.custom_id, status, error_text(payload)).record())
                summary.failed += 1
            bar.update(1)

        if todo and job.ray:
            from lorafleet.serving.batch_ray import answer_on_ray

            answer_on_ray(job, todo, on_done)
        elif todo:
            asyncio.run(_answer_here(job, todo, on_done))
        bar.close()
    finally:
        out.close()
        errors.close()
    if not summary.failed:
        job.errors_path.unlink(missing_ok=True)
    return summary


async def _answer_here(job: BatchJob, rows: list[Row], on_done) -> None:
    if job.server:
        sender = Sender(job.server, api_key=job.api_key)
        try:
            await answer_all(sender, rows, job.concurrency, on_done)
        finally:
            await sender.close()
        return
    async with in_process_sender(job.settings or ServingConfig(), job.concurrency) as sender:
        await answer_all(sender, rows, job.concurrency, on_done)
