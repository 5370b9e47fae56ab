"""The values table of a Helm chart's README, generated from the `# --` comments of its values.yaml (helm-docs style).

    python tools/chart_readme.py helm/lorafleet-serving            # rewrite the table in README.md
    python tools/chart_readme.py helm/lorafleet-serving --check    # exit 1 if README.md is not current

The table sits between `<!-- values:start -->` and `<!-- values:end -->`. A key's description is the comment block
right above it, starting at `# --`; its default is its value in values.yaml.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

START, END = "<!-- values:start -->", "<!-- values:end -->"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):(?P<rest>.*)$")


@dataclass(frozen=True)
class ValueDoc:
    path: str
    kind: str
    default: str
    description: str


def documented_values(values_text: str) -> list[ValueDoc]:
    """Every key of values.yaml (outside list items) with its `# --` comment, in file order."""
    data = yaml.safe_load(values_text) or {}
    lines = values_text.splitlines()
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    docs = []
    for number, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        keys = [key for _, key in stack] + [match["key"]]
        stack.append((indent, match["key"]))
        value = _lookup(data, keys)
        docs.append(ValueDoc(".".join(keys), _kind(value), _default(value), _comment_above(lines, number)))
    return docs


def _lookup(data, keys: list[str]):
    for key in keys:
        data = data[key]
    return data


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "string", list: "list", dict: "object"}.get(type(value), "null")


def _default(value) -> str:
    if isinstance(value, dict) and value:
        return "see below"
    return f"`{json.dumps(value)}`"


def _comment_above(lines: list[str], number: int) -> str:
    block = []
    index = number - 1
    while index >= 0 and lines[index].lstrip().startswith("#"):
        block.insert(0, lines[index].strip().removeprefix("#").strip())
        if lines[index].lstrip().startswith("# --"):
            return " ".join(block).removeprefix("--").strip()
        index -= 1
    raise ValueError(f"values.yaml:{number + 1}: `{lines[number].strip()}` has no `# --` comment above it")


def values_table(values_text: str) -> str:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for doc in documented_values(values_text):
        description, default = (text.replace("|", "\\|") for text in (doc.description, doc.default))
        rows.append(f"| `{doc.path}` | {doc.kind} | {default} | {description} |")
    return "\n".join(rows)


def render_readme(readme: str, values_text: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md has no {START} ... {END} section")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{values_table(values_text)}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chart", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is not current")
    args = parser.parse_args()
    readme_path = args.chart / "README.md"
    readme = readme_path.read_text(encoding="utf-8")
    current = render_readme(readme, (args.chart / "values.yaml").read_text(encoding="utf-8"))
    if args.check:
        if current != readme:
            print(f"{readme_path} is not current: run python tools/chart_readme.py {args.chart}", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(current, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
