"""The config reference (docs/config.md), rendered from the schema so it cannot drift from it.

    python -m lorafleet.config_reference > docs/config.md
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lorafleet.adapter_config import METHOD_SECTIONS
from lorafleet.config import JobConfig

HEADER = """# Job config reference

Generated from `lorafleet/config.py` (`python -m lorafleet.config_reference > docs/config.md`; a test checks
it is current). Unknown keys are errors. Every command that takes a config accepts `--set key.path=value`.
"""


def _type_name(annotation: object) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in args)
    if origin is dict:
        return f"mapping of {_type_name(args[1])}"
    if isinstance(annotation, type) and not args:
        return "null" if annotation is type(None) else annotation.__name__
    return str(annotation).replace("typing.", "").replace("|", "\\|")


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "(computed)" if field.default_factory.__name__ == "default_storage_uri" else f"`{value}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default}`"


def render() -> str:
    lines = [HEADER]
    _render_section(lines, "top level", "", JobConfig)
    return "\n".join(lines) + "\n"


def _render_section(lines: list[str], title: str, prefix: str, section: type[BaseModel]) -> None:
    lines += ["", f"## {title}", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for key, field in section.model_fields.items():
        if key == "adapter" and section is JobConfig:
            lines.append(f"| `adapter` | one section per method | `method: lora` | {field.description} |")
            continue
        subsection = _section_of(field.annotation)
        if subsection is not None:
            nested.append((f"{prefix}{key}", subsection))
        default = f"see `{prefix}{key}`" if subsection is not None and field.default is not None else _default(field)
        row = f"| `{prefix}{key}` | {_type_name(field.annotation)} | {default} | {field.description or ''} |"
        lines.append(row)
    for name, subsection in nested:
        _render_section(lines, f"`{name}`", f"{name}.", subsection)
    if section is JobConfig:
        _render_adapter_methods(lines)


def _render_adapter_methods(lines: list[str]) -> None:
    lines += ["", "## `adapter`", "", "`adapter.method` picks the section; a knob of another method is an error."]
    for method, method_section in METHOD_SECTIONS.items():
        lines += ["", f"### `method: {method}`", "", method_section.__doc__ or "", ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, field in method_section.model_fields.items():
            if key != "method":
                kind, default = _type_name(field.annotation), _default(field)
                lines.append(f"| `adapter.{key}` | {kind} | {default} | {field.description} |")


def _section_of(annotation: object) -> type[BaseModel] | None:
    """The section model behind a field (`Section` or `Section | None`), else None (a mapping of them too)."""
    if typing.get_origin(annotation) is dict:
        return None
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


if __name__ == "__main__":
    print(render(), end="")
