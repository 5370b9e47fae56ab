"""`lorafleet registry verify [NAME]`: recompute the sha256 of every file of every visible version.

Catches tampering and bit rot: a changed, missing or extra file, a manifest that does not match its folder,
an alias that points at a version that is gone. Staging and other hidden folders are not versions and are
not checked (a killed publish leaves one; it was never visible).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.registry.aliases import read_aliases
from lorafleet.registry.layout import KINDS, Kind, NotFound, Registry, RegistryError, parse_reference
from lorafleet.registry.manifest import HASHES, MANIFEST, read_manifest, safe_relative, sha256_file


class TamperedVersion(RegistryError):
    """A registry version's files no longer match its manifest: it is refused everywhere it would be used."""


@dataclass(frozen=True)
class VerifyProblem:
    reference: str
    file: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.reference}/{self.file}" if self.file else self.reference
        return f"{where}: {self.message}"


@dataclass
class VerifyReport:
    checked: list[str] = field(default_factory=list)
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(storage_uri: str | Path | None, name: str | None = None, *, kind: Kind | None = None) -> VerifyReport:
    """Check every visible version (of `name`, or of everything) against its manifest."""
    registry = Registry.open(storage_uri, refetch=True)  # an object store: check what it holds now
    report = VerifyReport()
    only = parse_reference(name).name if name else None
    kinds = [kind] if kind else list(KINDS)
    if not registry.base.is_dir():
        raise NotFound(f"storage {registry.location} does not exist: there is no registry to verify")
    if only is not None and not any(registry.name_dir(only, each).is_dir() for each in kinds):
        raise NotFound(f"nothing named {only!r} in the registry at {registry.location}: nothing to verify")
    for each_kind in kinds:
        for entry in registry.names(each_kind):
            if only is not None and entry != only:
                continue
            versions = registry.versions(entry, each_kind)
            for version in versions:
                label = f"{each_kind}/{entry}@{version}"
                report.checked.append(label)
                folder = registry.version_dir(entry, version, each_kind)
                report.problems += [VerifyProblem(label, f, m) for f, m in check_version(folder, entry, version)]
            try:
                aliases = read_aliases(registry, entry, each_kind).aliases
            except RegistryError as exc:
                report.problems.append(VerifyProblem(f"{each_kind}/{entry}", "aliases.json", str(exc)))
                continue
            for alias, target in sorted(aliases.items()):
                if target not in versions:
                    report.problems.append(
                        VerifyProblem(f"{each_kind}/{entry}@{alias}", None, f"points at {target}, which does not exist")
                    )
    return report


def require_intact(folder: Path, name: str | None = None, version: str | None = None) -> None:
    """Refuse a version whose files no longer match its manifest (every load, promote and sync calls this).

    Hashes are cached by path + size + inode + mtime + ctime, so an unchanged version costs a few stat calls.
    """
    problems = check_version(folder, name, version, cached=True)
    if problems:
        where = f"{name}@{version}" if name and version else str(folder)
        listed = "; ".join(f"{folder / file if file else folder}: {message}" for file, message in problems)
        raise TamperedVersion(
            f"{where} does not match its manifest and is refused: {listed} "
            "(run `lorafleet registry verify`; publish a new version instead of editing one)"
        )


def check_version(
    folder: Path, name: str | None, version: str | None, *, cached: bool = False
) -> list[tuple[str | None, str]]:
    """(file, problem) pairs for one version folder; [] when every file matches its manifest.

    `cached` reuses hashes of files unchanged since they were last hashed (`registry verify` always re-reads).
    """
    hash_of = HASHES.sha256 if cached else sha256_file
    try:
        manifest = read_manifest(folder)
    except RegistryError as exc:
        return [(MANIFEST, str(exc))]
    problems: list[tuple[str | None, str]] = []
    root = folder.resolve()
    if name is not None and (manifest.name, manifest.version) != (name, version):
        problems.append((MANIFEST, f"says {manifest.name}@{manifest.version}, but lives in {name}/{version}"))
    for relative, expected in sorted(manifest.files.items()):
        if not safe_relative(relative):
            problems.append((relative, "manifest names a path outside the version folder"))
            continue
        path = folder / relative
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            problems.append((relative, "is a link: versions hold regular files only"))
        elif not path.is_file():
            problems.append((relative, "missing"))
        elif (size := path.stat().st_size) != expected.size:
            problems.append((relative, f"size {size} != {expected.size} in the manifest (modified)"))
        elif hash_of(path) != expected.sha256:
            problems.append((relative, "sha256 does not match the manifest (modified)"))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative != MANIFEST and relative not in manifest.files:
            problems.append((relative, "not listed in the manifest (added after publishing)"))
    return problems
