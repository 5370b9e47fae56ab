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
errors file is rewritten by every run, since its rows are tried again. Nothing else is ever overwritten: an OUTPUT
or errors file holding anything but this command's rows, or the input itself, is refused (exit 2), untouched.
An input line over 8 MiB, not UTF-8, nested deeper than 64 levels or holding a huge number is that row's error.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.errors import LorafleetError
from lorafleet.serving.batch_rows import (
    BatchJob,
    ForeignOutput,
    JsonlAppender,
    Row,
    RowError,
    check_errors_file,
    finished_rows,
    output_record,
    read_rows,
)
from lorafleet.serving.batch_send import Sender, answer_all, error_text, in_process_sender
from lorafleet.serving.config import ServingConfig


class BatchFailed(LorafleetError):
    """Some rows failed; they are listed, with line numbers and reasons, in the errors file."""

    exit_code = 1


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


def run_batch(job: BatchJob) -> BatchSummary:
    """Answer every row of `job.input` not yet in `job.output`; failures go to the errors file."""
    from tqdm import tqdm

    refuse_input_as_output(job)
    done_lines, done_ids = finished_rows(job.output)
    check_errors_file(job.errors_path)
    summary = BatchSummary(errors_path=job.errors_path)
    todo: list[Row] = []
    out = JsonlAppender(job.output)
    errors = JsonlAppender(job.errors_path, truncate=True)
    try:
        for row in read_rows(job.input, job.model):
            if isinstance(row, RowError):  # never answered, so never skipped (a duplicate shares its id with one)
                errors.append(row.record())
                summary.failed += 1
            elif (row.custom_id in done_ids) if row.custom_id is not None else (row.line in done_lines):
                summary.skipped += 1
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


def refuse_input_as_output(job: BatchJob) -> None:
    """--out or its errors file being the input would destroy the input: refused before anything is opened."""
    for path, what in ((job.output, "--out"), (job.errors_path, "the errors file")):
        if path.exists() and job.input.exists() and path.samefile(job.input):
            raise ForeignOutput(f"{what} {path} is the input file itself: choose another --out")


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
