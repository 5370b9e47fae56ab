"""The `sweep:` section of a job config: a search space over config paths and how Ray Tune explores it.

    sweep:
      space:
        adapter.r: {choice: [8, 16, 32]}
        training.learning_rate: {loguniform: [1.0e-4, 1.0e-3]}
      num_samples: 4
      metric: eval_loss
      scheduler: {type: asha, grace_period: 10}
      max_concurrent_trials: 2

Space entries may also sit straight under `sweep:` (their keys hold a dot, the section's own keys do not).
Whether each path exists and takes each value is checked against the job config itself
(`lorafleet.sweep_trials.sweep_problems`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lorafleet.schema import Section

DOMAIN_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class Domain(Section):
    """One parameter's values: `{choice: [...]}`, `{grid: [...]}`, `{uniform: [low, high]}`,
    `{loguniform: [low, high]}` or `{randint: [low, high]}` (high excluded, as in Ray Tune)."""

    kind: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: list[Any]

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any) -> Any:
        if isinstance(data, dict) and set(data) <= {"kind", "values"}:
            return data
        if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in DOMAIN_KINDS:
            raise ValueError(f"must be a mapping with one of {', '.join(DOMAIN_KINDS)}, e.g. {{choice: [8, 16]}}")
        kind, values = next(iter(data.items()))
        if not isinstance(values, list):
            raise ValueError(f"{kind} takes a list, got {values!r}")
        return {"kind": kind, "values": [_number_if_exponent(v) for v in values]}

    @model_validator(mode="after")
    def _values_fit_the_kind(self) -> Domain:
        if self.kind in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{self.kind} is empty: list at least one value")
            return self
        if len(self.values) != 2 or not all(_is_number(v) for v in self.values):
            raise ValueError(f"{self.kind} takes [low, high] (two numbers), got {self.values!r}")
        low, high = self.values
        if self.kind == "randint" and not all(isinstance(v, int) for v in self.values):
            raise ValueError(f"randint takes two integers, got {self.values!r}")
        if not low < high:
            raise ValueError(f"{self.kind} needs low < high, got {self.values!r}")
        if self.kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.values!r}")
        return self

    def probes(self) -> list[Any]:
        """Values that, if the config takes them all, show the path takes anything this domain samples."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        low, high = self.values
        if self.kind == "randint":
            return [low, high - 1]
        return [low, low + (high - low) * 0.37, high]  # a fractional inner value: an int field refuses it

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(self.values)
        if self.kind == "grid":
            return tune.grid_search(self.values)
        return getattr(tune, self.kind)(*self.values)


EXPONENT_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _number_if_exponent(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads `1e-4` as a string (it wants `1.0e-4`); in a search space it is the number."""
    return float(value) if isinstance(value, str) and EXPONENT_NUMBER.match(value) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class AshaSection(Section):
    type: Literal["asha"] = "asha"
    grace_period: int | None = Field(
        None, gt=0, description="Steps every trial runs before it can be stopped (default: training.eval_steps)."
    )
    reduction_factor: float = Field(2.0, gt=1, description="Keep the best 1/reduction_factor at each rung.")
    max_t: int | None = Field(
        None, gt=0, description="Stop every trial at this step (default: none stopped before training.max_steps)."
    )


class SweepSection(Section):
    space: dict[str, Domain] = Field(description="Config path → values, e.g. `adapter.r: {choice: [8, 16]}`.")
    num_samples: int = Field(1, gt=0, description="Samples of the space (each grid point is run this many times).")
    metric: str = Field("eval_loss", description="The metric trials are ranked (and stopped) by: one runs report.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher `metric` is better.")
    scheduler: AshaSection | None = Field(
        None, description="`asha` (or {type: asha, grace_period, reduction_factor}): stop bad trials early."
    )
    max_concurrent_trials: int | None = Field(None, gt=0, description="Trials at once (default: as many as fit).")
    seed: int | None = Field(None, ge=0, description="Seed of the random search (same seed, same trials).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        dotted = {key: data.pop(key) for key in list(data) if isinstance(key, str) and "." in key}
        if dotted:
            data["space"] = {**(data.get("space") or {}), **dotted}
        if data.get("scheduler") in ("none", None):
            data.pop("scheduler", None)
        elif isinstance(data.get("scheduler"), str):
            data["scheduler"] = {"type": data["scheduler"]}
        return data

    @field_validator("space")
    @classmethod
    def _space_not_empty(cls, space: dict[str, Domain]) -> dict[str, Domain]:
        if not space:
            raise ValueError("the space is empty: give at least one config path, e.g. adapter.r: {choice: [8, 16]}")
        return space

    def param_space(self) -> dict[str, Any]:
        return {path: domain.to_tune() for path, domain in self.space.items()}
