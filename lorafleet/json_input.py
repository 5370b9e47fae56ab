"""JSON from outside (data rows, batch rows, adapter configs): parsed within bounds, every failure one clear error.

`json.loads` alone lets hostile input escape as the wrong exception: deep nesting raises RecursionError (or
passes the parser and breaks whatever walks the value later), an integer of more than 4300 digits raises a bare
ValueError, and `NaN` / `Infinity` parse into floats that poison arithmetic. `parse_json` turns each into
`JsonInputError` (a ValueError) whose message says what is wrong, and callers add the file and line.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

MAX_DEPTH = 64  # objects/arrays inside each other; real rows and configs stay under 10
MAX_FILE_BYTES = 2**20  # a config file (adapter_config.json, policy, manifest): far below any real one's limit


class JsonInputError(ValueError):
    """The text is not JSON this project accepts; the message says why (no file or line: the caller knows them)."""


def parse_json(text: str | bytes, *, allow_nonfinite: bool = False, max_depth: int = MAX_DEPTH) -> Any:
    """The value of `text`, refusing invalid UTF-8, invalid JSON, huge integers, NaN/Infinity and deep nesting."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonInputError(f"not UTF-8 text (byte 0x{text[exc.start]:02x}): save it as UTF-8") from None
    hooks = {} if allow_nonfinite else {"parse_constant": _refuse_constant, "parse_float": _finite_float}
    try:
        value = json.loads(text, **hooks)
    except json.JSONDecodeError as exc:
        raise JsonInputError(f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise JsonInputError(f"invalid JSON: nested deeper than {max_depth} levels") from None
    except JsonInputError:
        raise
    except ValueError as exc:  # int() of more digits than sys.get_int_max_str_digits()
        raise JsonInputError(f"invalid JSON: a number is too large ({exc})") from None
    check_depth(value, max_depth)
    return value


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """JsonInputError if containers nest deeper than `max_depth` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            raise JsonInputError(f"invalid JSON: nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


def read_json_file(path: str | Path, *, max_bytes: int = MAX_FILE_BYTES, **options: Any) -> Any:
    """`parse_json` of a small file; OSError for a missing one, JsonInputError for one that is not a regular file
    (a FIFO would block the reader forever), is over `max_bytes`, or does not parse."""
    return parse_json(read_small_file(path, max_bytes), **options)


def read_small_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; opened without blocking, so a FIFO or a device is
    refused at once instead of hanging the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
            raise JsonInputError(f"{path} is {kind}")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JsonInputError(f"{path} is larger than {max_bytes} bytes, the most it may hold")
    return data


def _refuse_constant(name: str) -> Any:
    raise JsonInputError(f"invalid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonInputError(f"invalid JSON: the number {text[:20]} is out of range")
    return value
