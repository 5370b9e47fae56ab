"""What `lorafleet sync` is told: which registry, which servers, which adapters, how often, and whether aliases
are routed (serving/alias_router.py). Durations are Go-style (`30s`, `5m`, `1m30s`)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorafleet.paths import default_storage_uri
from lorafleet.registry import RegistryError, parse_reference

DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
URL_PATTERN = re.compile(r"^https?://[^/\s]+(/[^\s]*)?$")


def parse_duration(value: str | float) -> float:
    """Seconds in a Go-style duration (`30s`, `5m`, `1m30s`, `1h`, `250ms`) or a plain number of seconds."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = DURATION_PART.findall(text)
            if not parts or "".join(number + unit for number, unit in parts) != text:
                raise ValueError(f"invalid duration {value!r}: use e.g. 30s, 5m, 1m30s, 250ms or seconds") from None
            seconds = sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise ValueError(f"invalid duration {value!r}: it must be more than zero")
    return seconds


class SyncConfig(BaseModel):
    """What `lorafleet sync` keeps in step: which registry, which servers, which adapters."""

    model_config = ConfigDict(extra="forbid")

    storage: str = Field(default_factory=default_storage_uri, description="Storage root holding the registry.")
    targets: list[str] = Field(min_length=1, description="Base URLs of the servers to sync (every replica).")
    adapters: list[str] | None = Field(
        None, description="References NAME[@ALIAS|@vN] to serve; None: every published name at `latest`."
    )
    interval_s: float = Field(30.0, description="Seconds between passes (Go-style durations accepted: 30s, 5m).")
    api_key: str | None = Field(None, description="Bearer token of the servers.")
    probe_prompt: str = Field("Hello", min_length=1, description="Prompt of the 1-token probe of a new version.")
    retries: int = Field(3, ge=0, description="Retries of one HTTP call on connection errors and 5xx.")
    backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubled after each retry.")
    timeout_s: float = Field(120.0, gt=0, description="Timeout of one HTTP call (loads can take a while).")
    route: bool = Field(
        False,
        description="Load every version under a name of its own (`price.v3-<digest>`), never reusing a name for "
        "other weights, and resolve aliases in the router (serving/alias_router.py): what vLLM needs.",
    )

    @field_validator("interval_s", mode="before")
    @classmethod
    def _duration(cls, value: str | float) -> float:
        return parse_duration(value)

    @field_validator("targets")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        bad = [url for url in value if not URL_PATTERN.match(url)]
        if bad:
            raise ValueError(f"not a server URL: {', '.join(bad)} (expected http://HOST:PORT)")
        return [url.rstrip("/") for url in value]

    @field_validator("adapters")
    @classmethod
    def _references(cls, value: list[str] | None) -> list[str] | None:
        served: dict[str, str] = {}
        for reference in value or []:
            try:
                name = parse_reference(reference).name
            except RegistryError as exc:
                raise ValueError(str(exc)) from None
            if name in served:
                raise ValueError(f"{served[name]} and {reference} would both be served as {name!r}: keep one")
            served[name] = reference
        return value

    @model_validator(mode="after")
    def _one_target_when_routing(self) -> SyncConfig:
        if self.route and len(self.targets) != 1:
            raise ValueError("routing aliases needs exactly one --target: the server the router sits in front of")
        return self
