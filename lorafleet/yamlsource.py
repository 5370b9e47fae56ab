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
        return cls.parse(path.read_text(encoding="utf-8"), name=str(path), base_dir=path.resolve().parent)

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
            _collect_lines(node, (), lines)
        return cls(name=name, base_dir=base_dir, data={} if data is None else data, lines=lines)

    def location_of(self, keys: list[str]) -> str:
        """`file:line` of the deepest key path that exists in the file (a missing key: its parent)."""
        path = tuple(keys)
        while path and path not in self.lines:
            path = path[:-1]
        line = self.lines.get(path)
        return f"{self.name}:{line}" if line else self.name


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
