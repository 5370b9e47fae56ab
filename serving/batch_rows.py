"""The rows of a `lorafleet batch` job: the job itself, input rows read and validated, output rows appended.

See `lorafleet.serving.batch_inference` for the row formats and the resume rule.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.serving.config import ServingConfig
from lorafleet.serving.protocol import ChatCompletionRequest, CompletionRequest

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


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
