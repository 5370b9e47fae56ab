"""The config reference (docs/config.md), rendered from the schema so it cannot drift from it.

    python -m lorafleet.config_reference > docs/config.md
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

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
    top_level = [name for name, field in JobConfig.model_fields.items() if not _is_section(field.annotation)]
    lines += ["## top level", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name in top_level:
        field = JobConfig.model_fields[name]
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |")
    for name, field in JobConfig.model_fields.items():
        if not _is_section(field.annotation):
            continue
        section: type[BaseModel] = field.annotation  # type: ignore[assignment]
        lines += ["", f"## `{name}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, sub in section.model_fields.items():
            lines.append(f"| `{name}.{key}` | {_type_name(sub.annotation)} | {_default(sub)} | {sub.description or ''} |")
    return "\n".join(lines) + "\n"


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel) and not typing.get_args(annotation)


if __name__ == "__main__":
    print(render(), end="")
