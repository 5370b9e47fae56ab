"""Where the registry keeps things on shared storage, and the one parser of names and references.

    <storage>/adapters/<name>/v1/ ...            PEFT adapter + manifest.json (immutable)
    <storage>/adapters/<name>/aliases.json       latest / prod / ... with their history
    <storage>/adapters/<name>/policy.yaml        promotion gate (optional)
    <storage>/adapters/<name>/.retired/v3        tombstone: v3 was unpublished, its number is never reused
    <storage>/adapters/<name>/.staging-*         a publish in progress (or killed): readers ignore it
    <storage>/models/<name>/v1/ ...              merged full models, same rules

Readers only ever look at folders named `v<N>`; everything hidden (starting with '.') is invisible.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from lorafleet.errors import LorafleetError
from lorafleet.names import NAME_RULE, is_valid_name
from lorafleet.object_store import is_s3_uri
from lorafleet.paths import default_storage_uri
from lorafleet.registry.folders import CLAIMS_DIR, KINDS, RETIRED_DIR, VERSION_PATTERN, Kind
from lorafleet.storage import StorageRoot

if TYPE_CHECKING:
    from lorafleet.registry.remote import RemoteRegistry

LATEST = "latest"
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
STAGING_PREFIX = ".staging-"


class RegistryError(LorafleetError):
    """A registry operation was refused or failed (not found, corrupt, contract, gate)."""

    exit_code = 1


class InvalidReference(RegistryError):
    """A name, version, alias or `NAME@VERSION` reference is malformed (a user mistake: exit 2)."""

    exit_code = 2


class NotFound(RegistryError):
    pass


def validate_name(name: str) -> str:
    if not is_valid_name(name):
        raise InvalidReference(f"invalid registry name {name!r}: use {NAME_RULE}")
    return name


def validate_version(version: str) -> str:
    if not VERSION_PATTERN.fullmatch(version):
        raise InvalidReference(f"invalid version {version!r}: versions are v1, v2, ...")
    return version


def validate_alias(alias: str) -> str:
    if not ALIAS_PATTERN.fullmatch(alias) or re.fullmatch(r"v[0-9]+", alias):
        raise InvalidReference(
            f"invalid alias {alias!r}: use 1-32 lowercase letters, digits, '_' or '-', starting with a letter, "
            "and not shaped like a version (v3)"
        )
    return alias


def version_number(version: str) -> int:
    match = VERSION_PATTERN.fullmatch(version)
    if not match:
        raise InvalidReference(f"invalid version {version!r}: versions are v1, v2, ...")
    return int(match.group(1))


class Reference(NamedTuple):
    """`NAME`, `NAME@v3` or `NAME@alias`; unpacks as `(name, version_or_alias)`."""

    name: str
    selector: str

    @property
    def is_version(self) -> bool:
        return bool(VERSION_PATTERN.fullmatch(self.selector))

    def __str__(self) -> str:
        return f"{self.name}@{self.selector}"


def parse_reference(text: str | Reference, *, default: str = LATEST) -> Reference:
    """Parse and validate `NAME[@VERSION|@ALIAS]`; a bare name means `default` (latest)."""
    if isinstance(text, Reference):
        return text
    if not isinstance(text, str):
        raise InvalidReference(f"invalid reference {text!r}: expected NAME, NAME@v3 or NAME@alias")
    name, sep, selector = text.partition("@")
    validate_name(name)
    if not sep:
        return Reference(name, default)
    if VERSION_PATTERN.fullmatch(selector):
        return Reference(name, selector)
    if ALIAS_PATTERN.fullmatch(selector) and not re.fullmatch(r"v[0-9]+", selector):
        return Reference(name, selector)
    raise InvalidReference(f"invalid reference {text!r}: after '@' put a version (v3) or an alias (prod, latest)")


@dataclass(frozen=True)
class Registry:
    """The registry part of one storage root: a local/NFS/PVC path, or an object store (`s3://`) read through
    its verified local mirror (lorafleet.registry.remote), which is then `root`."""

    root: StorageRoot
    remote: RemoteRegistry | None = field(default=None, compare=False)

    @classmethod
    def open(cls, storage_uri: str | Path | None = None, *, refetch: bool = False) -> Registry:
        """The registry at `storage_uri`; on an object store its mirror is brought up to date first (`refetch`:
        every version downloaded again, to check what the store holds now)."""
        uri = str(storage_uri) if storage_uri else default_storage_uri()
        root = StorageRoot(uri)
        if is_s3_uri(uri):
            from lorafleet.registry.remote import RemoteRegistry

            remote = RemoteRegistry(uri)
            remote.mirror.mkdir(parents=True, exist_ok=True)
            remote.pull(refetch=refetch)
            return cls(StorageRoot(str(remote.mirror)), remote)
        if not root.is_local:
            raise RegistryError(f"{uri}: the registry lives on a path (local, NFS, PVC, file://) or on s3://")
        return cls(StorageRoot(str(root.local_path.expanduser().resolve())))

    @property
    def location(self) -> str:
        """Where the registry is, as users name it."""
        return self.remote.uri if self.remote is not None else str(self.base)

    @property
    def base(self) -> Path:
        return self.root.local_path

    def kind_dir(self, kind: Kind) -> Path:
        if kind not in KINDS:
            raise InvalidReference(f"unknown registry kind {kind!r}: {' or '.join(KINDS)}")
        return self.base / kind

    def name_dir(self, name: str, kind: Kind = "adapters") -> Path:
        return self.kind_dir(kind) / validate_name(name)

    def version_dir(self, name: str, version: str, kind: Kind = "adapters") -> Path:
        return self.name_dir(name, kind) / validate_version(version)

    def names(self, kind: Kind = "adapters") -> list[str]:
        folder = self.kind_dir(kind)
        if not folder.is_dir():
            return []
        return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and is_valid_name(entry.name))

    def versions(self, name: str, kind: Kind = "adapters") -> list[str]:
        """Visible versions, oldest first. Staging, retired and other hidden folders never count."""
        folder = self.name_dir(name, kind)
        if not folder.is_dir():
            return []
        found = [entry.name for entry in folder.iterdir() if VERSION_PATTERN.fullmatch(entry.name) and entry.is_dir()]
        return sorted(found, key=version_number)

    def retired_versions(self, name: str, kind: Kind = "adapters") -> list[str]:
        return self._marked_versions(name, kind, RETIRED_DIR)

    def _marked_versions(self, name: str, kind: Kind, marker_dir: str) -> list[str]:
        folder = self.name_dir(name, kind) / marker_dir
        if not folder.is_dir():
            return []
        return sorted((e.name for e in folder.iterdir() if VERSION_PATTERN.fullmatch(e.name)), key=version_number)

    def latest(self, name: str, kind: Kind = "adapters") -> str | None:
        versions = self.versions(name, kind)
        return versions[-1] if versions else None

    def next_number(self, name: str, kind: Kind = "adapters") -> int:
        """One more than any version ever claimed (unpublished ones included: numbers are never reused)."""
        taken = self.retired_versions(name, kind) + self._marked_versions(name, kind, CLAIMS_DIR)
        used = [version_number(v) for v in self.versions(name, kind) + taken]
        return max(used, default=0) + 1
