"""Rows from a data reference: a local .json/.jsonl/.csv/.parquet file, `builtin:<name>`, or a hub dataset.

    load_rows("/data/train.jsonl", max_rows=100)

Every row remembers where it came from, `file:line` (JSON, JSON lines, CSV) or `file[index]` (parquet, hub
datasets), so that validation can point at it. A JSON line that does not parse comes back as a row with
`error` set: validation reports it together with every other bad row instead of stopping at the first.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.config import DATA_FILE_SUFFIXES
from lorafleet.errors import DataError, LorafleetError, Problem

BUILTIN_PREFIX = "builtin:"


class DataSourceError(LorafleetError):
    """Data that cannot be used as a whole: a missing file, an unknown type or format, an unreachable hub
    dataset, too few rows for the holdout, nothing left to train on."""

    exit_code = 2


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from."""

    source: str
    line: int  # 1-based line (JSON, JSON lines, CSV); 0-based index where the source has no lines
    data: Any
    error: str | None = None  # why the record could not be parsed (then `data` is None)
    indexed: bool = False

    @property
    def location(self) -> str:
        return f"{self.source}[{self.line}]" if self.indexed else f"{self.source}:{self.line}"


def load_rows(reference: str, *, max_rows: int | None = None) -> list[Row]:
    """The rows of a local file, a `builtin:` dataset or a hub dataset (only its first `max_rows`)."""
    if reference.startswith(BUILTIN_PREFIX):
        from lorafleet.demo_data import resolve_builtin_dataset

        return read_file(Path(resolve_builtin_dataset(reference)), max_rows=max_rows)
    path = Path(reference).expanduser()
    if path.is_absolute() or reference.endswith(DATA_FILE_SUFFIXES):
        return read_file(path, max_rows=max_rows)
    return _read_hub(reference, max_rows)


def read_file(path: Path, *, max_rows: int | None = None) -> list[Row]:
    source = str(path)
    if path.suffix not in DATA_FILE_SUFFIXES:
        raise DataSourceError(f"{source}: unsupported file type; use one of {', '.join(DATA_FILE_SUFFIXES)}")
    if not path.is_file():
        raise DataSourceError(f"data file not found: {source}")
    if path.suffix == ".parquet":
        return _read_parquet(path, max_rows)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: drop a byte-order mark
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        problem = Problem(f"{source}:{line}", f"not UTF-8 text (byte 0x{raw[exc.start]:02x}): save the file as UTF-8")
        raise DataError(source, [problem]) from None
    if path.suffix == ".csv":
        rows = _read_csv(source, text, max_rows)
    elif path.suffix == ".json" and text.lstrip().startswith("["):
        rows = _read_json_array(source, text, max_rows)
    else:
        rows = _read_json_lines(source, text, max_rows)
    if not rows:
        raise DataError(source, [Problem(source, "the file has no rows: nothing to train or evaluate on")])
    return rows


def _read_json_lines(source: str, text: str, max_rows: int | None) -> list[Row]:
    rows: list[Row] = []
    # Split on "\n" only: str.splitlines() would also split on U+2028, which JSON strings may contain.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if max_rows is not None and len(rows) >= max_rows:
            break
        try:
            rows.append(Row(source, number, json.loads(line)))
        except json.JSONDecodeError as exc:
            rows.append(Row(source, number, None, error=f"invalid JSON: {exc.msg} (column {exc.colno})"))
    return rows


def _read_json_array(source: str, text: str, max_rows: int | None) -> list[Row]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = Problem(f"{source}:{exc.lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})")
        raise DataError(source, [problem]) from None
    values = values[:max_rows] if max_rows is not None else values
    return [Row(source, line, value) for line, value in zip(_element_lines(text, len(values)), values, strict=True)]


def _element_lines(text: str, count: int) -> list[int]:
    """The line on which each of the first `count` elements of a (valid) top-level JSON array starts."""
    decoder = json.JSONDecoder()
    lines: list[int] = []
    position, line, counted_to = text.index("[") + 1, 1, 0
    while len(lines) < count:
        while text[position] in " \t\r\n,":
            position += 1
        line += text.count("\n", counted_to, position)
        counted_to = position
        lines.append(line)
        _, position = decoder.raw_decode(text, position)
    return lines


def _read_csv(source: str, text: str, max_rows: int | None) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:  # an empty file
        return []
    rows: list[Row] = []
    first_line = reader.line_num + 1
    for record in reader:
        if max_rows is not None and len(rows) >= max_rows:
            break
        record.pop(None, None)  # cells beyond the header
        rows.append(Row(source, first_line, record))
        first_line = reader.line_num + 1
    return rows


def _read_parquet(path: Path, max_rows: int | None) -> list[Row]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except pyarrow.ArrowException as exc:
        raise DataSourceError(f"{path}: not a readable parquet file ({exc})") from None
    if max_rows is not None:
        table = table.slice(0, max_rows)
    return [Row(str(path), index, record, indexed=True) for index, record in enumerate(table.to_pylist())]


def _read_hub(name: str, max_rows: int | None) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as exc:  # not found, offline, gated: all mean "cannot read this reference"
        raise DataSourceError(
            f"cannot load hub dataset {name!r} ({type(exc).__name__}: {exc}); "
            "for a local file give a path ending in .json/.jsonl/.csv/.parquet"
        ) from None
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return [Row(name, index, dict(record), indexed=True) for index, record in enumerate(dataset)]
