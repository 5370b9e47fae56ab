"""Move aliases: `promote` behind the eval gate of policy.yaml, `rollback` to the previous promotion.

lorafleet promote pricing v3                      # prod → v3 if v3's metrics pass policy.yaml
lorafleet promote pricing v3 --force --reason "hotfix, eval pending"
lorafleet rollback pricing                        # prod → the version it had before v3
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.registry.aliases import editing_aliases
from lorafleet.registry.layout import (
    LATEST,
    InvalidReference,
    Kind,
    NotFound,
    Registry,
    RegistryError,
    parse_reference,
    validate_alias,
)
from lorafleet.registry.lookup import resolve_version
from lorafleet.registry.manifest import read_manifest
from lorafleet.registry.policy import load_policy
from lorafleet.registry.verify import require_intact


class PromotionRefused(RegistryError):
    """The candidate fails the promotion gate; carries every failure."""

    def __init__(self, subject: str, alias: str, failures: list[str]):
        self.failures = failures
        lines = [f"{subject} is not promoted to {alias}: {len(failures)} gate failure(s) (policy.yaml)"]
        lines += [f"  - {failure}" for failure in failures]
        lines.append("  fix the model, change policy.yaml, or override with --force --reason TEXT")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class AliasMove:
    name: str
    alias: str
    version: str
    previous: str | None
    forced: bool = False
    gate_failures: list[str] = field(default_factory=list)


def promote(
    storage_uri: str | Path | None,
    name: str,
    version: str,
    *,
    alias: str = "prod",
    force: bool = False,
    reason: str | None = None,
    kind: Kind = "adapters",
) -> AliasMove:
    """Point `alias` at `version` (a version or another alias) if it passes the gate, or if forced with a reason."""
    registry = Registry.open(storage_uri)
    alias = _movable(alias)
    if force and not (reason and reason.strip()):
        raise InvalidReference("--force needs --reason TEXT: it is recorded in the alias history")
    ref = parse_reference(f"{name}@{version}") if "@" not in name else parse_reference(name)
    target = resolve_version(registry, ref, kind)
    require_intact(registry.version_dir(ref.name, target, kind), ref.name, target)
    candidate = read_manifest(registry.version_dir(ref.name, target, kind))
    policy = load_policy(registry, ref.name, kind)
    with editing_aliases(registry, ref.name, kind) as state:
        previous = state.aliases.get(alias)
        if previous == target:
            return AliasMove(ref.name, alias, target, previous)
        failures: list[str] = []
        if policy is not None and policy.applies_to(alias):
            current = None
            if previous and registry.version_dir(ref.name, previous, kind).is_dir():
                current = read_manifest(registry.version_dir(ref.name, previous, kind)).metrics
            failures = policy.evaluate(candidate.metrics, current, current_ref=f"{alias} ({ref.name}@{previous})")
        if failures and not force:
            raise PromotionRefused(f"{ref.name}@{target}", alias, failures)
        state.record("promote", alias, target, forced=force, reason=reason, gate=failures)
    return AliasMove(ref.name, alias, target, previous, forced=force, gate_failures=failures)


def rollback(
    storage_uri: str | Path | None,
    name: str,
    *,
    alias: str = "prod",
    reason: str | None = None,
    kind: Kind = "adapters",
) -> AliasMove:
    """Point `alias` back at the version it was promoted to before the current one."""
    registry = Registry.open(storage_uri)
    alias = _movable(alias)
    name = parse_reference(name).name
    if not registry.name_dir(name, kind).is_dir():
        raise NotFound(f"nothing named {name!r} is published")
    with editing_aliases(registry, name, kind) as state:
        stack = state.promotion_stack(alias)
        if len(stack) < 2:
            raise RegistryError(
                f"{name}@{alias} has no earlier promotion to roll back to (history: {stack or 'empty'})"
            )
        target = stack[-2]
        if not registry.version_dir(name, target, kind).is_dir():
            raise NotFound(f"{name}@{target}, the previous {alias}, was unpublished: promote a version instead")
        previous = state.aliases.get(alias)
        state.record("rollback", alias, target, reason=reason)
    return AliasMove(name, alias, target, previous)


def _movable(alias: str) -> str:
    validate_alias(alias)
    if alias == LATEST:
        raise InvalidReference("`latest` always follows the newest version; promote to another alias (e.g. prod)")
    return alias
