"""YAML files that remember where each key came from, so errors can say file:line."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lorafleet.errors import ConfigError, Problem


@dataclass
class YamlSource:
    """A parsed YAML document plus the line of every key path (1-based)."""

    name: str
    base_dir: Path
    data: Any
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> YamlSource:
        if not path.is_file():
            raise ConfigError(str(path), [Problem(str(path), "config file not found")])
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            problem = Problem(f"{path}:{line}", f"not UTF-8 text (byte 0x{raw[exc.start]:02x}): save it as UTF-8")
            raise ConfigError(str(path), [problem]) from None
        return cls.parse(text, name=str(path), base_dir=path.resolve().parent)

    @classmethod
    def parse(cls, text: str, name: str, base_dir: Path) -> YamlSource:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
            raise ConfigError(name, [Problem(where, f"invalid YAML: {exc.problem or exc}")]) from None
        except yaml.YAMLError as exc:
            raise ConfigError(name, [Problem(name, f"invalid YAML: {exc}")]) from None
        lines: dict[tuple[str, ...], int] = {}
        if node is not None:
            problems = check_node_graph(node, name)
            if problems:
                raise ConfigError(name, problems)
            _collect_lines(node, (), lines)
        return cls(name=name, base_dir=base_dir, data={} if data is None else data, lines=lines)

    def location_of(self, keys: list[str]) -> str:
        """`file:line` of the deepest key path that exists in the file (a missing key: its parent)."""
        path = tuple(keys)
        while path and path not in self.lines:
            path = path[:-1]
        line = self.lines.get(path)
        return f"{self.name}:{line}" if line else self.name


MAX_EXPANDED_NODES = 100_000  # a config is hundreds of nodes; aliases must not multiply that into millions


def check_node_graph(root: yaml.Node, name: str) -> list[Problem]:
    """Duplicate keys (both lines named), recursive aliases, and alias expansion beyond MAX_EXPANDED_NODES.

    Runs on the composed node graph, before anything is constructed, so a YAML "billion laughs" costs nothing.
    """
    problems: list[Problem] = []
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in on_path:
            raise _Recursive(node)
        if key in sizes:
            return sizes[key]
        on_path.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            _duplicate_keys(node, name, problems)
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_NODES:
                break
        on_path.discard(key)
        sizes[key] = total
        return total

    try:
        if size(root) > MAX_EXPANDED_NODES:
            problems.append(
                Problem(name, f"aliases expand this document past {MAX_EXPANDED_NODES:,} nodes: not a config file")
            )
    except _Recursive as exc:
        problems.append(Problem(f"{name}:{exc.node.start_mark.line + 1}", "a recursive alias (it contains itself)"))
    return problems


class _Recursive(Exception):
    def __init__(self, node: yaml.Node):
        self.node = node


def _duplicate_keys(node: yaml.MappingNode, name: str, problems: list[Problem]) -> None:
    seen: dict[str, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        line = key_node.start_mark.line + 1
        if key_node.value in seen:
            problems.append(
                Problem(f"{name}:{line}", f"duplicate key {key_node.value!r} (first at line {seen[key_node.value]})")
            )
        else:
            seen[key_node.value] = line


def _collect_lines(node: yaml.Node, prefix: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            out[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = (*prefix, str(index))
            out[key] = item.start_mark.line + 1
            _collect_lines(item, key, out)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.max_steps=20` → (["training", "max_steps"], 20); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError("expected key.path=value")
    parts = key.strip().split(".")
    if any(not part for part in parts):
        raise ValueError(f"bad key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"value is not valid YAML: {exc}") from None
    return parts, value


def apply_override(data: Any, keys: list[str], value: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError("the config's top level is not a mapping")
    result = dict(data)
    node = result
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(keys[: depth + 1])} is not a section")
        node[key] = dict(child)
        node = node[key]
    node[keys[-1]] = value
    return result


def apply_overrides(data: Any, overrides: list[str], source: str) -> Any:
    """Every `--set key.path=value` applied in order; ConfigError naming each bad one."""
    problems: list[Problem] = []
    for override in overrides:
        try:
            keys, value = parse_override(override)
            data = apply_override(data, keys, value)
        except ValueError as exc:
            problems.append(Problem(f"--set {override}", str(exc)))
    if problems:
        raise ConfigError(source, problems)
    return data


UNKNOWN_KEY = "unknown key (check the spelling)"


def validation_message(error: dict[str, Any]) -> str:
    """A pydantic error as a person reads it: no "Value error," prefix, the value that was refused."""
    message = re.sub(r"^Value error, ", "", error["msg"])
    if error["type"] == "extra_forbidden":
        return UNKNOWN_KEY
    if error["type"] == "missing":
        return "required key is missing"
    if "input" in error and error["type"] != "value_error" and not isinstance(error["input"], dict):
        return f"{message} (got {error['input']!r})"
    return message


def validation_problems(
    exc: ValidationError, source: YamlSource | None = None, *, where: Callable[[list[str]], str] | None = None
) -> list[Problem]:
    """Every error of `exc` as a Problem at `file:line key.path` (with `source`) or at `where(keys)`."""
    problems = []
    for error in exc.errors():
        keys = [str(part) for part in error["loc"]]
        if where is not None:
            location = where(keys)
        else:
            location = f"{source.location_of(keys)} {'.'.join(keys) or '(top level)'}" if source else ".".join(keys)
        problems.append(Problem(location or "(top level)", validation_message(error)))
    return problems
