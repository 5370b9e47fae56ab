"""Rows from a data reference: a local .json/.jsonl/.csv/.parquet file, `builtin:<name>`, or a hub dataset.

    load_rows("/data/train.jsonl", max_rows=100)

Every row remembers where it came from, `file:line` (JSON, JSON lines, CSV) or `file[index]` (parquet, hub
datasets), so that validation can point at it. A JSON line that does not parse comes back as a row with
`error` set: validation reports it together with every other bad row instead of stopping at the first.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.config import DATA_FILE_SUFFIXES
from lorafleet.errors import DataError, LorafleetError, Problem
from lorafleet.json_input import MAX_DEPTH, JsonInputError, parse_json

BUILTIN_PREFIX = "builtin:"
MAX_ROW_BYTES = 8 * 2**20  # one JSON line or CSV row; far past any context window, far below any memory
MAX_JSON_ARRAY_BYTES = 256 * 2**20  # a .json array is parsed whole; larger data belongs in JSON lines
TOO_LONG = f"the line is longer than {MAX_ROW_BYTES // 2**20} MiB, the most one row may hold"


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
    check_regular_file(path, "data file")
    if path.suffix == ".parquet":
        return _read_parquet(path, max_rows)
    if path.suffix == ".csv":
        rows = _read_csv(path, max_rows)
    elif path.suffix == ".json" and _starts_with_array(path):
        rows = _read_json_array(path, max_rows)
    else:
        rows = _read_json_lines(path, max_rows)
    if not rows:
        raise DataError(source, [Problem(source, "the file has no rows: nothing to train or evaluate on")])
    return rows


def check_regular_file(path: Path, what: str) -> None:
    """DataSourceError unless `path` is a regular file (a FIFO or a device would block or never end)."""
    if not path.exists():
        raise DataSourceError(f"{what} not found: {path}")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
        raise DataSourceError(f"{what} {path} is {kind}: give a .json/.jsonl/.csv/.parquet file")


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(line number, the line's bytes) for every line; None for a line over MAX_ROW_BYTES, which is skipped
    without ever being held in memory whole."""
    with open(path, "rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_ROW_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                while (rest := handle.readline(2**20)) and not rest.endswith(b"\n"):
                    pass
                yield number, None
                continue
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark
            yield number, raw


def _read_json_lines(path: Path, max_rows: int | None) -> list[Row]:
    source = str(path)
    rows: list[Row] = []
    # Lines end at "\n" only: str.splitlines() would also split on U+2028, which JSON strings may contain.
    for number, line in _lines(path):
        if line is not None and not line.strip():
            continue
        if max_rows is not None and len(rows) >= max_rows:
            break
        if line is None:
            rows.append(Row(source, number, None, error=TOO_LONG))
            continue
        try:
            rows.append(Row(source, number, parse_json(line.rstrip(b"\r\n"))))
        except JsonInputError as exc:
            rows.append(Row(source, number, None, error=str(exc)))
    return rows


def _read_json_array(path: Path, max_rows: int | None) -> list[Row]:
    source = str(path)
    size = path.stat().st_size
    if size > MAX_JSON_ARRAY_BYTES:
        raise DataSourceError(
            f"{source} is a JSON array of {size / 2**20:.0f} MiB, over the {MAX_JSON_ARRAY_BYTES // 2**20} MiB "
            "a JSON array may hold (it is parsed whole): save it as JSON lines (.jsonl), one row a line"
        )
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        values = parse_json(raw, max_depth=MAX_DEPTH + 1)  # the array itself is one level
        text = raw.decode("utf-8")
    except JsonInputError as exc:
        raise DataError(source, [Problem(source, str(exc))]) from None
    if not isinstance(values, list):
        raise DataError(source, [Problem(source, "a .json file must hold one array of rows (or JSON lines)")])
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


def _read_csv(path: Path, max_rows: int | None) -> list[Row]:
    source = str(path)
    csv.field_size_limit(MAX_ROW_BYTES)
    lines = _csv_text_lines(path)
    reader = csv.DictReader(lines, strict=True)
    rows: list[Row] = []
    first_line = 1
    try:
        if reader.fieldnames is None:  # an empty file
            return []
        first_line = reader.line_num + 1
        for record in reader:
            if max_rows is not None and len(rows) >= max_rows:
                break
            record.pop(None, None)  # cells beyond the header
            rows.append(Row(source, first_line, record))
            first_line = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(source, [Problem(f"{source}:{first_line}", _csv_message(exc))]) from None
    finally:
        lines.close()
    return rows


def _csv_text_lines(path: Path) -> Iterator[str]:
    """The file's lines as text for the csv reader; DataError naming the line for bad UTF-8 or an endless line."""
    for number, raw in _lines(path):
        if raw is None:
            raise DataError(str(path), [Problem(f"{path}:{number}", TOO_LONG)])
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            message = f"not UTF-8 text (byte 0x{raw[exc.start]:02x}): save the file as UTF-8"
            raise DataError(str(path), [Problem(f"{path}:{number}", message)]) from None


def _csv_message(exc: csv.Error) -> str:
    text = str(exc)
    if "field larger than field limit" in text:
        return f"a field is longer than {MAX_ROW_BYTES // 2**20} MiB, the most a row may hold"
    if "unexpected end of data" in text:
        return "a quoted field is never closed (unterminated quote from this row to the end of the file)"
    return f"not valid CSV: {text}"


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
