"""Reading the registry: resolve `name@alias` to a folder + manifest, list what is published.

Serving calls `resolve(storage_uri, "pricing@prod")` and loads `result.path` (a plain PEFT folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet.registry.aliases import read_aliases
from lorafleet.registry.layout import KINDS, LATEST, Kind, NotFound, Reference, Registry, RegistryError, parse_reference
from lorafleet.registry.manifest import Manifest, read_manifest
from lorafleet.registry.verify import require_intact


@dataclass(frozen=True)
class AdapterVersion:
    """One published, immutable version: its folder (load it with `PeftModel.from_pretrained`) and manifest."""

    name: str
    version: str
    kind: Kind
    path: Path
    manifest: Manifest

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"


def resolve_version(registry: Registry, reference: str | Reference, kind: Kind = "adapters") -> str:
    """The concrete version (`v3`) that `NAME`, `NAME@v3` or `NAME@alias` names right now."""
    name, selector = parse_reference(reference)
    what = "adapter" if kind == "adapters" else "merged model"
    if not registry.name_dir(name, kind).is_dir():
        raise NotFound(f"no {what} named {name!r} in {registry.location}/{kind}")
    if Reference(name, selector).is_version:
        if not registry.version_dir(name, selector, kind).is_dir():
            known = ", ".join(registry.versions(name, kind)) or "none"
            raise NotFound(f"{name}@{selector} does not exist (versions: {known})")
        return selector
    aliases = read_aliases(registry, name, kind).aliases
    if selector not in aliases:
        if selector == LATEST:
            raise NotFound(f"{name} has no published version yet")
        raise NotFound(
            f"{name} has no alias {selector!r} (aliases: {', '.join(sorted(aliases)) or 'none'}); "
            f"set it with `lorafleet promote {name} vN --alias {selector}`"
        )
    version = aliases[selector]
    if not registry.version_dir(name, version, kind).is_dir():
        raise NotFound(f"{name}@{selector} points at {version}, which no longer exists")
    return version


def resolve(
    storage_uri: str | Path | None, reference: str | Reference, *, kind: Kind = "adapters", verify: bool = True
) -> AdapterVersion:
    """`name@alias` / `name@vN` / `name` (latest) → the version's folder and manifest, checked against it.

    The folder never changes once visible; an alias may move later, so re-resolve to follow it. A version whose
    files no longer match its manifest raises TamperedVersion (pass `verify=False` only to describe it).
    """
    registry = Registry.open(storage_uri)
    name = parse_reference(reference).name
    version = resolve_version(registry, reference, kind)
    path = registry.version_dir(name, version, kind)
    if verify:
        require_intact(path, name, version)
    return AdapterVersion(name=name, version=version, kind=kind, path=path, manifest=read_manifest(path))


@dataclass(frozen=True)
class EntrySummary:
    kind: Kind
    name: str
    versions: list[str]
    aliases: dict[str, str]
    error: str | None = None  # why its aliases could not be read (the others are listed all the same)

    def as_dict(self) -> dict[str, object]:
        fields: dict[str, object] = {"kind": self.kind, "name": self.name, "versions": self.versions}
        return fields | {"aliases": self.aliases} | ({"error": self.error} if self.error else {})


def list_entries(
    storage_uri: str | Path | None, name: str | None = None, *, kind: Kind | None = None
) -> list[EntrySummary]:
    """Every registry entry (or only `name`) with its visible versions and aliases."""
    registry = Registry.open(storage_uri)
    entries = []
    for each_kind in [kind] if kind else KINDS:
        names = registry.names(each_kind)
        if name is not None:
            names = [n for n in names if n == parse_reference(name).name]
        for entry in names:
            versions = registry.versions(entry, each_kind)
            try:
                aliases, error = read_aliases(registry, entry, each_kind).aliases, None
            except RegistryError as exc:  # one broken name never hides the healthy ones
                aliases, error = {}, str(exc)
            entries.append(EntrySummary(each_kind, entry, versions, dict(sorted(aliases.items())), error))
    return entries
