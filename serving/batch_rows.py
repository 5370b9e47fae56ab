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

from lorafleet.errors import LorafleetError
from lorafleet.json_input import JsonInputError, parse_json
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.protocol import ChatCompletionRequest, CompletionRequest

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MAX_ROW_BYTES = 8 * 2**20  # one request line


class ForeignOutput(LorafleetError):
    """--out (or its errors file) holds something `lorafleet batch` did not write: it is never truncated."""

    exit_code = 2


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
    """Every non-blank line as a validated Row, or a RowError saying what is wrong with it (one bad line never
    stops the others: bad UTF-8, nesting, huge numbers and over-long lines are each that line's error)."""
    seen: dict[str, int] = {}
    with open(path, "rb") as handle:
        number = 0
        while raw := handle.readline(MAX_ROW_BYTES + 1):
            number += 1
            if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                while (rest := handle.readline(2**20)) and not rest.endswith(b"\n"):
                    pass  # the rest of the over-long line, never held whole
                yield RowError(number, None, 413, f"the line is longer than {MAX_ROW_BYTES // 2**20} MiB")
                continue
            if not raw.strip():
                continue
            row = parse_row(number, raw, default_model)
            if isinstance(row, Row) and row.custom_id is not None:
                if row.custom_id in seen:
                    yield RowError(
                        number, row.custom_id, 400, f"custom_id {row.custom_id!r} is also on line {seen[row.custom_id]}"
                    )
                    continue
                seen[row.custom_id] = number
            yield row


def parse_row(number: int, text: str | bytes, default_model: str | None) -> Row | RowError:
    try:
        data = parse_json(text)
    except JsonInputError as exc:
        return RowError(number, None, 400, str(exc))
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
    """Line numbers and custom_ids already answered in `path`; a torn last line (a crash) is cut off.

    Only a file this command wrote is ever appended to or cut: every complete line must be one of its output
    rows, and only a last line without its newline counts as torn. Anything else is ForeignOutput.
    """
    lines: set[int] = set()
    ids: set[str] = set()
    if not path.exists():
        return lines, ids
    check_own_file(path, "--out")
    keep = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                break  # the torn last line of a crashed run: appends are whole rows, each fsynced
            record = _own_record(raw, OUTPUT_KEYS)
            if record is None:
                raise ForeignOutput(
                    f"--out {path}: line {number} is not a row `lorafleet batch` writes, so the file is not its "
                    "earlier output; it is left untouched: choose another --out"
                )
            keep += len(raw)
            lines.add(record["line"])
            if record.get("custom_id") is not None:
                ids.add(str(record["custom_id"]))
    if keep != path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
    return lines, ids


OUTPUT_KEYS = frozenset({"line", "custom_id", "model", "response"})
ERROR_KEYS = frozenset({"line", "custom_id", "status", "error"})


def check_errors_file(path: Path) -> None:
    """The errors file is rewritten by every run: only when it is missing or holds only error rows."""
    if not path.exists():
        return
    check_own_file(path, "the errors file")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.endswith(b"\n") and _own_record(raw, ERROR_KEYS) is None:
                raise ForeignOutput(
                    f"{path}: line {number} is not an error row of `lorafleet batch`, and this file would be "
                    "rewritten: move it, or choose another --out"
                )


def check_own_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ForeignOutput(f"{what} {path} exists and is not a regular file: choose another --out")


def _own_record(raw: bytes, keys: frozenset[str]) -> dict | None:
    try:
        record = parse_json(raw)
    except JsonInputError:
        return None
    if not isinstance(record, dict) or set(record) != keys or type(record["line"]) is not int:
        return None
    return record


def output_record(row: Row, response: dict[str, Any]) -> dict[str, Any]:
    return {"line": row.line, "custom_id": row.custom_id, "model": row.model, "response": response}
