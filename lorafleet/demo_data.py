"""The demo datasets that ship with lorafleet, generated on this machine (never downloaded).

    lorafleet data make-demo --out data/ --seed 0     # data/price/{train,test}.jsonl, data/support/{train,test}.jsonl

    from lorafleet.demo_data import resolve_builtin_dataset
    resolve_builtin_dataset("builtin:price")          # <LORAFLEET_HOME>/data/price/train.jsonl, made on first use
    resolve_builtin_dataset("builtin:support/test")

Tasks (alpaca rows, see `lorafleet.demo_tasks`):
- `price`: product description → price ("$123.45"), after a hidden multiplicative pricing rule plus noise.
- `support`: support ticket → "Category: <category>\\nReply: <one sentence>".
Views (the same rows in another format, written beside them):
- `price-completion`: completion rows, "<description>\\nPrice:" → " $123.45" (about half the tokens of the
  alpaca rows through SmolLM2's chat template, whose default system prompt alone is 16 tokens).

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
class View:
    """A task's rows reshaped into another format (same rows, same order, same split)."""

    name: str
    task: str
    reshape: Callable[[dict[str, str]], dict[str, str]]


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
VIEWS = {view.name: view for view in (View("price-completion", "price", price.as_completion),)}


GENERATOR_VERSION = 1  # bump when the generated rows change, so cached copies are not reused


def default_demo_dir() -> Path:
    return data_dir() / f"demo-v{GENERATOR_VERSION}"


def make_demo_datasets(out_dir: Path | None, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write `<out_dir>/<task or view>/{train,test}.jsonl` for every demo task and view; default: the data cache."""
    root = out_dir if out_dir is not None else default_demo_dir()
    written: dict[str, dict[str, Path]] = {}

    def write(name: str, splits: dict[str, list[dict[str, str]]]) -> None:
        written[name] = {}
        for split, rows in splits.items():
            path = root / name / f"{split}.jsonl"
            write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
            written[name][split] = path

    for task in TASKS.values():
        splits = make_splits(task, seed)
        write(task.name, splits)
        for view in VIEWS.values():
            if view.task == task.name:
                write(view.name, {split: [view.reshape(row) for row in rows] for split, rows in splits.items()})
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
    return [f"{BUILTIN_PREFIX}{name}{suffix}" for name in (*DEMO_TASKS, *VIEWS) for suffix in ("", "/test")]


def resolve_builtin_dataset(reference: str) -> Path:
    """The file behind `builtin:<task or view>` (train) or `builtin:<task or view>/test`; generated with seed 0
    if missing."""
    name, _, split = reference.removeprefix(BUILTIN_PREFIX).partition("/")
    split = split or "train"
    known = name in TASKS or name in VIEWS
    if not reference.startswith(BUILTIN_PREFIX) or not known or split not in SPLITS:
        raise LorafleetError(f"unknown builtin dataset {reference!r}; known: {', '.join(builtin_dataset_names())}")
    path = default_demo_dir() / name / f"{split}.jsonl"
    if not path.is_file():
        make_demo_datasets(None, seed=0)
    return path
