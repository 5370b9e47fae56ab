"""Read a small YAML file into a pydantic model; every problem reported at once with its file:line."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from lorafleet.errors import ConfigError, Problem
from lorafleet.yamlsource import YamlSource, validation_problems

ModelT = TypeVar("ModelT", bound=BaseModel)


def load_yaml_model(path: Path, model: type[ModelT]) -> ModelT:
    source = YamlSource.read(Path(path))
    return validate_yaml_data(source.data, source, model)


def validate_yaml_data(data: object, source: YamlSource, model: type[ModelT]) -> ModelT:
    if not isinstance(data, dict):
        raise ConfigError(source.name, [Problem(source.name, "the top level must be a mapping")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source.name, validation_problems(exc, source)) from None
