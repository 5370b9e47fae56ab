"""`lorafleet registry verify [NAME]`: recompute the sha256 of every file of every visible version.

Catches tampering and bit rot: a changed, missing or extra file, a manifest that does not match its folder,
an alias that points at a version that is gone. Staging and other hidden folders are not versions and are
not checked (a killed publish leaves one; it was never visible).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.registry.aliases import read_aliases
from lorafleet.registry.layout import KINDS, Kind, Registry, RegistryError, parse_reference
from lorafleet.registry.manifest import MANIFEST, read_manifest, safe_relative, sha256_file


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
    registry = Registry.open(storage_uri)
    report = VerifyReport()
    only = parse_reference(name).name if name else None
    for each_kind in [kind] if kind else KINDS:
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


def check_version(folder: Path, name: str, version: str) -> list[tuple[str | None, str]]:
    """(file, problem) pairs for one version folder; [] when every file matches its manifest."""
    try:
        manifest = read_manifest(folder)
    except RegistryError as exc:
        return [(MANIFEST, str(exc))]
    problems: list[tuple[str | None, str]] = []
    if (manifest.name, manifest.version) != (name, version):
        problems.append((MANIFEST, f"says {manifest.name}@{manifest.version}, but lives in {name}/{version}"))
    for relative, expected in sorted(manifest.files.items()):
        if not safe_relative(relative):
            problems.append((relative, "manifest names a path outside the version folder"))
            continue
        path = folder / relative
        if not path.is_file():
            problems.append((relative, "missing"))
        elif path.stat().st_size != expected.size:
            problems.append((relative, f"size {path.stat().st_size} != {expected.size} in the manifest (modified)"))
        elif sha256_file(path) != expected.sha256:
            problems.append((relative, "sha256 does not match the manifest (modified)"))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative != MANIFEST and relative not in manifest.files:
            problems.append((relative, "not listed in the manifest (added after publishing)"))
    return problems
