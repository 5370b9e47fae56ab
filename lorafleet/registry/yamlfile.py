"""Read a small YAML file into a pydantic model; every problem reported at once with its file:line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from lorafleet.errors import ConfigError, Problem
from lorafleet.yamlsource import YamlSource

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
        problems = []
        for error in exc.errors():
            keys = [str(part) for part in error["loc"]]
            message = re.sub(r"^Value error, ", "", error["msg"])
            if error["type"] == "extra_forbidden":
                message = "unknown key (check the spelling)"
            problems.append(Problem(f"{source.location_of(keys)} {'.'.join(keys) or '(top level)'}", message))
        raise ConfigError(source.name, problems) from None
