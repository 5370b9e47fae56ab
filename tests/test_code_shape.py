"""Small modules, short functions: no module over 400 lines and no function over 60 outside tests, unless a
`# long: <reason>` comment stands on the line above the definition (or at the top of the module)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
FOLDERS = ("lorafleet", "training", "serving", "bench", "tools")


def _sources() -> list[Path]:
    return sorted(path for folder in FOLDERS for path in (REPO / folder).rglob("*.py"))


def _excused(lines: list[str], line_number: int) -> bool:
    above = lines[line_number - 2].strip() if line_number >= 2 else ""
    return above.startswith("# long: ") and len(above) > len("# long: ")


def test_no_module_over_400_lines() -> None:
    too_long = []
    for path in _sources():
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_MODULE_LINES and not any(line.startswith("# long: ") for line in lines[:30]):
            too_long.append(f"{path.relative_to(REPO)}: {len(lines)} lines")
    assert too_long == []


def test_no_function_over_60_lines() -> None:
    too_long = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not _excused(lines, first):
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []
