"""A registry on an object store (`s3://bucket/prefix`): the same layout as on a filesystem, committed without
renames, and read through a verified local mirror.

    <prefix>/adapters/<name>/v<N>/...             the version's files; manifest.json is written LAST
    <prefix>/adapters/<name>/.claims/v<N>         the number, claimed by a create-if-absent write
    <prefix>/adapters/<name>/aliases.json         replaced only if unchanged since read (If-Match)
    <prefix>/adapters/<name>/policy.yaml, .retired/v<N>

A version is visible only once its manifest exists, so a publish killed at any point leaves nothing a reader
lists or serves (its claim keeps the number from being reused). Readers work on a local mirror
(`$LORAFLEET_HOME/object-registries/<bucket>/<prefix>`) that holds visible versions only: each is downloaded
once (versions never change) and checked against its manifest's sha256 by the same code as a local registry
before any use.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorafleet.names import is_valid_name
from lorafleet.object_store import ObjectFolder, PreconditionFailed, S3Location
from lorafleet.paths import home
from lorafleet.registry.folders import CLAIMS_DIR, KINDS, RETIRED_DIR, VERSION_PATTERN, Kind
from lorafleet.storage import install_dir_atomic, write_bytes_atomic

ALIASES = "aliases.json"
POLICY = "policy.yaml"
MANIFEST = "manifest.json"


def mirror_path(location: S3Location) -> Path:
    return home() / "object-registries" / location.bucket / (location.key or "_root")


def mirror_of(uri: str) -> Path:
    """The local folder an object-store registry is read through (what servers load adapters from)."""
    return mirror_path(S3Location.parse(uri))


class RemoteRegistry:
    """The object-store side of a registry whose local mirror is `mirror`."""

    def __init__(self, uri: str):
        self.location = S3Location.parse(uri)
        self.store = ObjectFolder(self.location)
        self.mirror = mirror_path(self.location)

    @property
    def uri(self) -> str:
        return self.location.uri

    # ---- reading: remote -> mirror --------------------------------------------------------------

    def pull(self, *, refetch: bool = False) -> None:
        """Bring the mirror up to date: visible versions (downloaded once; `refetch` downloads them again), claims,
        tombstones, aliases and policies; versions unpublished remotely leave the mirror."""
        entries: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for kind in KINDS:
            for item in self.store.list(f"{kind}/"):
                parts = item.key.split("/")
                if len(parts) >= 3 and parts[1]:
                    entries[(kind, parts[1])][parts[2]].append(("/".join(parts[3:]), item))
        for kind in KINDS:  # names only the mirror has (all removed remotely) are emptied, not deleted
            local_kind = self.mirror / kind
            for local in [p for p in local_kind.iterdir() if p.is_dir()] if local_kind.is_dir() else []:
                entries.setdefault((kind, local.name), defaultdict(list))
        for (kind, name), children in entries.items():
            if is_valid_name(name):  # a key shaped otherwise ('..', hidden) is not an entry of the registry
                self._pull_entry(kind, name, children, refetch=refetch)

    def _pull_entry(self, kind: str, name: str, children: dict[str, list], *, refetch: bool) -> None:
        local = self.mirror / kind / name
        local.mkdir(parents=True, exist_ok=True)
        visible = {
            child for child, files in children.items()
            if VERSION_PATTERN.fullmatch(child) and any(rel == MANIFEST for rel, _ in files)
        }  # fmt: skip
        for version in sorted(visible):
            if refetch or not (local / version).is_dir():
                self._fetch_version(kind, name, version, [rel for rel, _ in children[version] if rel])
        claimed = {version for version, _ in children.get(CLAIMS_DIR, [])}
        retired = {version for version, _ in children.get(RETIRED_DIR, [])}
        for entry in local.iterdir():
            # Gone from the store: unpublished (a tombstone), or deleted by hand (no claim). A claimed version not
            # visible in this listing was just published from this machine, after the listing was taken.
            gone = entry.name in retired or entry.name not in claimed
            if VERSION_PATTERN.fullmatch(entry.name) and entry.name not in visible and gone:
                shutil.rmtree(entry, ignore_errors=True)
        for marker_dir in (CLAIMS_DIR, RETIRED_DIR):
            for version, _ in children.get(marker_dir, []):
                if VERSION_PATTERN.fullmatch(version) and not (local / marker_dir / version).exists():
                    write_bytes_atomic(local / marker_dir / version, b"")
        for single in (ALIASES, POLICY):
            self._pull_file(f"{kind}/{name}/{single}", local / single)

    def _fetch_version(self, kind: str, name: str, version: str, files: list[str]) -> None:
        """Every object of the version, as it is, into the mirror (checked against the manifest at each use)."""
        self.mirror.mkdir(parents=True, exist_ok=True)
        version_objects = ObjectFolder(self.location.child(kind, name, version))
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=self.mirror) as staging:
            for relative in files:
                version_objects.download_into(relative, Path(staging))
            install_dir_atomic(Path(staging), self.mirror / kind / name / version, replace=True)

    def _pull_file(self, key: str, path: Path) -> str | None:
        found = self.store.read(key)
        if found is None:
            path.unlink(missing_ok=True)
            return None
        write_bytes_atomic(path, found[0])
        return found[1]

    # ---- writing: mirror -> remote --------------------------------------------------------------

    def claim(self, kind: Kind, name: str, version: str) -> bool:
        """Take the number `version` for `name`; False when another publisher has it."""
        try:
            self.store.write(f"{kind}/{name}/{CLAIMS_DIR}/{version}", b"", if_absent=True)
        except PreconditionFailed:
            return False
        return True

    def push_version(self, kind: Kind, name: str, version: str, folder: Path) -> None:
        """Upload a claimed version: every file, then the manifest, which makes it visible."""
        prefix = f"{kind}/{name}/{version}"
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
            self.store.upload(f"{prefix}/{path.relative_to(folder).as_posix()}", path)
        self.store.write(f"{prefix}/{MANIFEST}", (folder / MANIFEST).read_bytes(), if_absent=True)

    def retire_version(self, kind: Kind, name: str, version: str) -> None:
        """Unpublish: tombstone, then the manifest (now invisible), then the rest."""
        prefix = f"{kind}/{name}/{version}"
        self.store.write(f"{kind}/{name}/{RETIRED_DIR}/{version}", b"")
        self.store.delete(f"{prefix}/{MANIFEST}")
        for item in list(self.store.list(f"{prefix}/")):
            self.store.delete(item.key)

    def push_policy(self, kind: Kind, name: str, path: Path) -> None:
        self.store.write(f"{kind}/{name}/{POLICY}", path.read_bytes())

    @contextmanager
    def editing_aliases(self, kind: Kind, name: str) -> Iterator[Path]:
        """Pull aliases.json fresh into the mirror and yield its path; on success write it back only if the store's
        copy is still the one read (If-Match; If-None-Match when there was none). Losing that race raises
        PreconditionFailed and writes nothing: no lock, so a killed editor never holds anyone up."""
        local = self.mirror / kind / name / ALIASES
        key = f"{kind}/{name}/{ALIASES}"
        etag = self._pull_file(key, local)
        yield local
        try:
            self.store.write(key, local.read_bytes(), if_absent=etag is None, if_etag=etag)
        except PreconditionFailed:
            self._pull_file(key, local)  # the mirror goes back to what the store holds
            raise PreconditionFailed(
                f"{self.uri}/{key} changed while this edit was made (another promote or publish): nothing was "
                "written; run it again"
            ) from None
