"""`lorafleet batch --ray ADDRESS`: the same job on Ray Data, one CPU engine per actor.

    lorafleet batch requests.jsonl --out answers.jsonl --ray auto --actors 4 --base builtin:smollm2-135m-instruct

The driver reads and validates the rows (bad rows go to the errors file with their line numbers, as without Ray)
and writes the output itself, so resume and the output format are the same. Request bodies cross into Ray Data as
JSON strings: Arrow would otherwise have to find one schema for chat and completion rows alike.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from lorafleet.serving.batch_rows import BatchJob, Row
from lorafleet.serving.batch_send import Sender, answer_all, in_process_sender
from lorafleet.serving.config import ServingConfig

ROWS_PER_CALL = 16


class EngineActor:
    """A Ray Data callable class: the engine is built once per actor, then answers batch after batch."""

    def __init__(self, settings_json: str, concurrency: int):
        self.settings = ServingConfig.model_validate_json(settings_json)
        self.concurrency = concurrency
        self.loop = asyncio.new_event_loop()
        self.context = in_process_sender(self.settings, concurrency)
        self.sender: Sender = self.loop.run_until_complete(self.context.__aenter__())

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = [
            Row(int(line), custom_id or None, endpoint, json.loads(body))
            for line, custom_id, endpoint, body in zip(
                batch["line"], batch["custom_id"], batch["endpoint"], batch["body"], strict=True
            )
        ]
        answers: dict[int, tuple[int, str]] = {}

        def on_done(row: Row, status: int, payload: Any) -> None:
            answers[row.line] = (status, json.dumps(payload))

        self.loop.run_until_complete(answer_all(self.sender, rows, self.concurrency, on_done))
        return {
            "line": [row.line for row in rows],
            "status": [answers[row.line][0] for row in rows],
            "payload": [answers[row.line][1] for row in rows],
        }

    def __del__(self) -> None:
        try:
            self.loop.run_until_complete(self.context.__aexit__(None, None, None))
        except Exception:  # the actor is going away; nothing left to tell
            pass


def answer_on_ray(job: BatchJob, rows: list[Row], on_done) -> None:
    """Answer `rows` on Ray Data actors; `on_done(row, status, payload)` on the driver as results stream back."""
    import ray

    if not ray.is_initialized():
        address = None if job.ray == "local" else job.ray
        ray.init(address=address, log_to_driver=False)
    items = [
        {"line": row.line, "custom_id": row.custom_id or "", "endpoint": row.endpoint, "body": json.dumps(row.body)}
        for row in rows
    ]
    settings = (job.settings or ServingConfig()).model_dump_json()
    results = ray.data.from_items(items).map_batches(
        EngineActor,
        fn_constructor_kwargs={"settings_json": settings, "concurrency": job.concurrency},
        batch_size=ROWS_PER_CALL,
        concurrency=job.actors,
        num_cpus=1,
    )
    by_line = {row.line: row for row in rows}
    for result in results.iter_rows():
        on_done(by_line[int(result["line"])], int(result["status"]), json.loads(result["payload"]))
