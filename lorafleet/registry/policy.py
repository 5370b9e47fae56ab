"""The promotion gate: `<storage>/adapters/<name>/policy.yaml`.

    thresholds:                 # absolute bounds on the candidate's eval metrics
      mae: {max: 20.0}
      accuracy: {min: 0.8}
    max_regression:             # relative to the version the alias points at now
      mae: 0.05                 # at most 5% worse (lower is better: inferred from the name or the bound)
      accuracy: {max: 0.02, lower_is_better: false}
    beat_baseline:              # must beat the best baseline of its eval report by this share
      mae: 0.1                  # at least 10% lower MAE than the best baseline (manifest `baselines.*.mae`)
    aliases: [prod]             # aliases the gate applies to (default: all)

Write it by hand, or `lorafleet registry policy NAME --set thresholds.mae.max=20`. No file: no gate.
Metric names are the keys of the version's manifest `metrics` (`lorafleet registry show NAME@vN`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorafleet.registry.layout import Kind, Registry, RegistryError
from lorafleet.registry.yamlfile import load_yaml_model, validate_yaml_data
from lorafleet.storage import write_text_atomic
from lorafleet.yamlsource import YamlSource, apply_overrides

POLICY_FILE = "policy.yaml"
LOWER_IS_BETTER_HINTS = ("loss", "mae", "mse", "rmse", "mape", "perplexity", "error", "wer", "cer", "latency")


class Bound(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class Regression(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max: float = Field(ge=0, description="Largest allowed relative worsening (0.05 = 5%).")
    lower_is_better: bool | None = Field(None, description="Default: from the threshold's bound, else the name.")


class PromotionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thresholds: dict[str, Bound] = Field(default_factory=dict)
    max_regression: dict[str, Regression] = Field(default_factory=dict)
    beat_baseline: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="metric: margin (0.1 = 10% better than the best baseline; 0 = better)."
    )
    aliases: list[str] | None = Field(None, description="Aliases the gate applies to; default: all.")

    @field_validator("max_regression", mode="before")
    @classmethod
    def _plain_numbers(cls, value: object) -> object:
        if isinstance(value, dict):
            return {k: {"max": v} if isinstance(v, int | float) else v for k, v in value.items()}
        return value

    def applies_to(self, alias: str) -> bool:
        return self.aliases is None or alias in self.aliases

    def lower_is_better(self, metric: str) -> bool:
        regression = self.max_regression.get(metric)
        if regression is not None and regression.lower_is_better is not None:
            return regression.lower_is_better
        bound = self.thresholds.get(metric)
        if bound is not None and (bound.min is None) != (bound.max is None):
            return bound.max is not None
        return any(hint in metric.lower() for hint in LOWER_IS_BETTER_HINTS)

    def evaluate(
        self, candidate: dict[str, float], current: dict[str, float] | None = None, current_ref: str = "current"
    ) -> list[str]:
        """Every reason the candidate's metrics fail the gate ([] = passes)."""
        failures = []
        for metric, bound in self.thresholds.items():
            value = candidate.get(metric)
            if value is None:
                failures.append(f"metric {metric!r} is missing (the version's run has no report/eval.json with it)")
            elif bound.min is not None and value < bound.min:
                failures.append(f"{metric} = {value:g} is below the minimum {bound.min:g}")
            elif bound.max is not None and value > bound.max:
                failures.append(f"{metric} = {value:g} is above the maximum {bound.max:g}")
        failures += self._baseline_failures(candidate)
        for metric, regression in self.max_regression.items():
            new, old = candidate.get(metric), (current or {}).get(metric)
            if current is None or old is None:
                continue  # nothing promoted yet, or it had no such metric: nothing to regress from
            if new is None:
                failures.append(f"metric {metric!r} is missing, so its regression from {current_ref} cannot be checked")
                continue
            lower = self.lower_is_better(metric)
            limit = old + regression.max * abs(old) if lower else old - regression.max * abs(old)
            if (new > limit) if lower else (new < limit):
                failures.append(
                    f"{metric} = {new:g} regresses more than {regression.max:.0%} from {current_ref} ({old:g}; "
                    f"limit {limit:g}, {'lower' if lower else 'higher'} is better)"
                )
        return failures

    def _baseline_failures(self, candidate: dict[str, float]) -> list[str]:
        failures = []
        for metric, margin in self.beat_baseline.items():
            new = candidate.get(metric)
            scored = {
                key.split(".")[1]: value
                for key, value in candidate.items()
                if key.startswith("baselines.") and key.count(".") == 2 and key.endswith(f".{metric}")
            }
            if new is None or not scored:
                failures.append(
                    f"beat_baseline {metric}: the version's metrics have no {metric!r} and baselines.*.{metric} "
                    "(evaluate it with `lorafleet eval`, eval.baselines not empty, before publishing)"
                )
                continue
            lower = self.lower_is_better(metric)
            best = (min if lower else max)(scored, key=scored.__getitem__)
            value = scored[best]
            limit = value - margin * abs(value) if lower else value + margin * abs(value)
            if not ((new < limit) if lower else (new > limit)):
                failures.append(
                    f"{metric} = {new:g} does not beat the best baseline ({best}: {value:g}) by {margin:.0%} "
                    f"(needs {'below' if lower else 'above'} {limit:g})"
                )
        return failures


def policy_path(registry: Registry, name: str, kind: Kind = "adapters") -> Path:
    return registry.name_dir(name, kind) / POLICY_FILE


def load_policy(registry: Registry, name: str, kind: Kind = "adapters") -> PromotionPolicy | None:
    path = policy_path(registry, name, kind)
    return load_yaml_model(path, PromotionPolicy) if policy_present(path) else None


def policy_present(path: Path) -> bool:
    """False only when no policy is there at all. A directory, a broken link or a FIFO where the policy belongs
    (a ConfigMap mounts files through links) is an error, never "no gate": the gate must not open by accident."""
    if not os.path.lexists(path):
        return False
    if path.is_file():
        return True
    if path.is_symlink() and not path.exists():
        kind = f"a broken link (to {os.readlink(path)})"
    else:
        kind = "a directory" if path.is_dir() else "not a regular file"
    raise RegistryError(
        f"promotion policy {path} is {kind}: the gate cannot be read, so nothing is promoted until it is a "
        "policy file again (or removed)"
    )


def set_policy(
    storage_uri: str | Path | None, name: str, overrides: list[str], *, kind: Kind = "adapters"
) -> PromotionPolicy:
    """Apply `key.path=value` overrides to the policy file (created if absent), validate, write atomically."""
    registry = Registry.open(storage_uri)
    path = policy_path(registry, name, kind)
    present = policy_present(path)
    source = YamlSource.read(path) if present else YamlSource.parse("", name=str(path), base_dir=path.parent)
    data = apply_overrides(source.data, overrides, str(path))
    policy = validate_yaml_data(data, source, PromotionPolicy)
    text = yaml.safe_dump(policy.model_dump(mode="json", exclude_none=True, exclude_defaults=True), sort_keys=False)
    write_text_atomic(path, text)
    path.chmod(0o644)
    if registry.remote is not None:
        registry.remote.push_policy(kind, name, path)
    return policy
