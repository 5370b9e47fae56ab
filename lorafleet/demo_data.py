"""The demo datasets that ship with lorafleet, generated on this machine (never downloaded).

    lorafleet data make-demo --out data/ --seed 0     # data/price/{train,test}.jsonl, data/support/{train,test}.jsonl

    from lorafleet.demo_data import resolve_builtin_dataset
    resolve_builtin_dataset("builtin:price")          # <LORAFLEET_HOME>/data/price/train.jsonl, made on first use
    resolve_builtin_dataset("builtin:support/test")

Tasks (alpaca rows, see `lorafleet.demo_tasks`):
- `price`: product description → price ("$123.45"), after a hidden multiplicative pricing rule plus noise.
- `support`: support ticket → "Category: <category>\\nReply: <one sentence>".

The same seed gives byte-identical files, so every Ray worker that resolves `builtin:price` on its own node
reads the same rows. Files are written atomically: concurrent generators just replace identical content.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorafleet.demo_tasks import price, support
from lorafleet.errors import LorafleetError
from lorafleet.paths import data_dir
from lorafleet.storage import write_text_atomic

BUILTIN_PREFIX = "builtin:"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DemoTask:
    """One demo task: how to draw a row, and how many rows each split gets."""

    name: str
    make_row: Callable[[random.Random], dict[str, str]]
    train_rows: int
    test_rows: int


TASKS = {
    task.name: task
    for task in (
        DemoTask("price", price.make_row, train_rows=3000, test_rows=300),
        DemoTask("support", support.make_row, train_rows=2000, test_rows=200),
    )
}
DEMO_TASKS = tuple(TASKS)


GENERATOR_VERSION = 1  # bump when the generated rows change, so cached copies are not reused


def default_demo_dir() -> Path:
    return data_dir() / f"demo-v{GENERATOR_VERSION}"


def make_demo_datasets(out_dir: Path | None, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write `<out_dir>/<task>/{train,test}.jsonl` for every demo task; default folder: the data cache."""
    root = out_dir if out_dir is not None else default_demo_dir()
    written: dict[str, dict[str, Path]] = {}
    for task in TASKS.values():
        splits = make_splits(task, seed)
        written[task.name] = {}
        for split, rows in splits.items():
            path = root / task.name / f"{split}.jsonl"
            write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
            written[task.name][split] = path
    return written


def make_splits(task: DemoTask, seed: int) -> dict[str, list[dict[str, str]]]:
    """Train and test rows of one task; no input appears twice, so test rows are never seen in training."""
    rng = random.Random(f"{task.name}:{seed}")  # one stream per task: adding a task leaves the others' rows alone
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < task.train_rows + task.test_rows:
        row = task.make_row(rng)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    return {"train": rows[: task.train_rows], "test": rows[task.train_rows :]}


def builtin_dataset_names() -> list[str]:
    return [f"{BUILTIN_PREFIX}{task}{suffix}" for task in DEMO_TASKS for suffix in ("", "/test")]


def resolve_builtin_dataset(reference: str) -> Path:
    """The file behind `builtin:<task>` (train) or `builtin:<task>/test`; generated with seed 0 if missing."""
    task, _, split = reference.removeprefix(BUILTIN_PREFIX).partition("/")
    split = split or "train"
    if not reference.startswith(BUILTIN_PREFIX) or task not in TASKS or split not in SPLITS:
        raise LorafleetError(f"unknown builtin dataset {reference!r}; known: {', '.join(builtin_dataset_names())}")
    path = default_demo_dir() / task / f"{split}.jsonl"
    if not path.is_file():
        make_demo_datasets(None, seed=0)
    return path
