"""Publish adapters and merged models as new immutable versions; unpublish them.

    lorafleet publish runs/pricing-20250101-120000 --name pricing [--target PROFILE.yaml]
    lorafleet publish pricing-20250101-120000 --name pricing-merged --merged

A version is staged whole in a hidden folder beside its target (`.staging-*`), fsynced, and only then
renamed to `v<N>`: renaming a folder onto a name that does not exist is atomic, and fails if another
publisher got there first (that one keeps `v<N>`; we take the next number). A crash or SIGKILL at any
moment leaves either no version or a complete one; a leftover `.staging-*` folder is invisible to readers.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.registry.aliases import editing_aliases, read_aliases, refresh_latest
from lorafleet.registry.checks import (
    adapter_weights_problems,
    check_finite_weights,
    check_safetensors,
    read_adapter_config,
)
from lorafleet.registry.contract import ContractViolation, ServingProfile, check_adapter_against_profile
from lorafleet.registry.layout import (
    LATEST,
    RETIRED_DIR,
    STAGING_PREFIX,
    InvalidReference,
    Kind,
    Registry,
    RegistryError,
    parse_reference,
    validate_name,
)
from lorafleet.registry.lookup import AdapterVersion, resolve_version
from lorafleet.registry.manifest import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    TOKENIZER_FILES,
    Manifest,
    adapter_facts,
    base_fingerprint,
    digest_tree,
    extract_metrics,
    local_base_folder,
    tokenizer_fingerprint,
    user_at_host,
    utc_now,
)
from lorafleet.runs import ADAPTER_DIR, CONFIG_FILE, MERGED_DIR, RECORD_FILE, REPORT_DIR, RunFolder, find_run_dir
from lorafleet.storage import fsync_dir, fsync_tree, write_text_atomic

MAX_CLAIM_ATTEMPTS = 1000
TAKEN_ERRNOS = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR)
VERSION_DIR_MODE = 0o755
UNPUBLISHED_PREFIX = ".unpublished-"
STALE_AFTER_S = 6 * 3600  # a staging folder untouched this long belongs to a publish that died


@dataclass
class RunInfo:
    """What the registry takes from a run folder: provenance and eval metrics."""

    run_dir: Path | None = None
    run_id: str | None = None
    config_hash: str | None = None
    data_hash: str | None = None
    base_model_revision: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, Any] | None = None

    @classmethod
    def read(cls, run_dir: Path) -> RunInfo:
        run_dir = Path(run_dir)
        folder = RunFolder(str(run_dir))
        record = folder.read_record()
        if record is not None and record.status == "failed":
            raise RegistryError(f"run {run_dir.name} failed: only runs that left an adapter are published")
        job = folder.read_config()
        eval_path = run_dir / REPORT_DIR / "eval.json"
        return cls(
            run_dir=run_dir,
            run_id=record.run_id if record else run_dir.name,
            config_hash=(record.config_hash if record else None) or (job.config_hash() if job else None),
            data_hash=record.data_hash if record else None,
            base_model_revision=job.model.revision if job else None,
            metrics=extract_metrics(json.loads(eval_path.read_text())) if eval_path.is_file() else {},
            summary=record.model_dump(include={"status", "global_step", "train_loss", "seconds"}, exclude_none=True)
            if record
            else {},
            sweep=record.sweep.model_dump() if record and record.sweep else None,
        )

    def manifest_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"run_id": self.run_id, "config_hash": self.config_hash, "data_hash": self.data_hash}
        fields["metrics"] = self.metrics
        if self.sweep:
            fields["sweep"] = self.sweep
        if self.run_id:
            fields["history"] = [
                {"event": "trained", "run_id": self.run_id, "run_dir": str(self.run_dir), **self.summary}
            ]
        return fields


def publish_adapter(
    storage_uri: str | Path | None,
    name: str,
    adapter_dir: Path,
    *,
    run_dir: Path | None = None,
    profile: ServingProfile | None = None,
    profile_source: str = "the target profile",
    parents: Iterable[str] = (),
    composition: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> AdapterVersion:
    """Publish a PEFT adapter folder as `<storage>/adapters/<name>/v<N>/` and move `latest` to it.

    `run_dir` adds provenance (run id, config/data hash, eval metrics); `profile` refuses, with every reason,
    an adapter that server would reject.
    """
    registry = Registry.open(storage_uri)
    validate_name(name)
    adapter_dir = Path(adapter_dir)
    files, config = _checked_adapter_files(adapter_dir)
    if profile is not None:
        reasons = check_adapter_against_profile(adapter_dir, profile)
        if reasons:
            raise ContractViolation(f"adapter {adapter_dir}", profile_source, reasons)
    run = RunInfo.read(run_dir) if run_dir else RunInfo()
    facts = adapter_facts(config)
    base_folder = local_base_folder(facts["base_model"])
    fields = (
        facts
        | run.manifest_fields()
        | {
            "kind": "adapter",
            "base_model_revision": facts["base_model_revision"] or run.base_model_revision,
            "base_fingerprint": base_fingerprint(base_folder) if base_folder else None,
            "tokenizer_fingerprint": tokenizer_fingerprint(adapter_dir)
            or (tokenizer_fingerprint(base_folder) if base_folder else None),
            "parents": list(parents),
            "composition": composition,
        }
    )
    if metrics:
        fields["metrics"] = {**fields["metrics"], **metrics}
    if composition:
        fields["history"] = fields.get("history", []) + [{"event": "composed", "parents": list(parents), **composition}]
    return _publish_files(registry, "adapters", name, files, fields, source=adapter_dir)


def _checked_adapter_files(adapter_dir: Path) -> tuple[list[tuple[str, Path]], dict]:
    """The files an adapter version holds and its config, each checked: regular files inside the folder (a FIFO
    would block the reader, a link could read anything), config and weights present, weights safetensors of
    finite floats with the tensors their method needs."""
    for required in (adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS):
        if required.exists() and not required.is_file():
            raise RegistryError(f"{required} is not a regular file (a FIFO, socket, device or directory)")
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (adapter_dir / f).is_file()]
    if missing:
        raise RegistryError(f"{adapter_dir} is not a PEFT adapter folder with safetensors weights: missing {missing}")
    present = [n for n in TOKENIZER_FILES if (adapter_dir / n).is_file() or (adapter_dir / n).is_symlink()]
    files = [(n, adapter_dir / n) for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *present)]
    _refuse_links(adapter_dir, files)  # before anything is read: a link's target is never opened
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    check_safetensors(weights)
    problems = adapter_weights_problems(weights, config["peft_type"].upper())
    if problems:
        raise RegistryError(f"{weights}: " + "; ".join(problems))
    check_finite_weights(weights)
    return files, config


def publish_merged(
    storage_uri: str | Path | None, name: str, model_dir: Path, *, run_dir: Path | None = None
) -> AdapterVersion:
    """Publish a merged full-model folder (config.json + safetensors) as `<storage>/models/<name>/v<N>/`."""
    registry = Registry.open(storage_uri)
    validate_name(name)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        raise RegistryError(f"{model_dir} is not a merged model folder: it needs config.json and *.safetensors")
    run = RunInfo.read(run_dir) if run_dir else RunInfo()
    fields: dict[str, Any] = run.manifest_fields() | {"kind": "model", "method": "merged"}
    run_adapter = (run_dir / ADAPTER_DIR / ADAPTER_CONFIG) if run_dir else None
    if run_adapter and run_adapter.is_file():
        facts = adapter_facts(json.loads(run_adapter.read_text()))
        fields |= {k: facts[k] for k in ("base_model", "peft_type", "rank", "target_modules")}
        fields["method"] = f"merged-{facts['method']}"
    fields["base_model_revision"] = run.base_model_revision
    quantized = quantization_fields(model_dir)
    fields |= quantized | {"metrics": {**fields.get("metrics", {}), **quantized.get("metrics", {})}}
    fields["base_fingerprint"] = base_fingerprint(model_dir)
    fields["tokenizer_fingerprint"] = tokenizer_fingerprint(model_dir)
    files = [
        (p.relative_to(model_dir).as_posix(), p)
        for p in sorted(model_dir.rglob("*"))
        if (p.is_file() or p.is_symlink()) and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)
    ]
    _refuse_links(model_dir, files)
    for relative, path in files:
        if relative.endswith(".safetensors"):
            check_safetensors(path)
            check_finite_weights(path)
    return _publish_files(registry, "models", name, files, fields, source=model_dir)


def quantization_fields(model_dir: Path) -> dict[str, Any]:
    """A `lorafleet quantize` folder's record: method, source, calibration sha256 and eval numbers."""
    from lorafleet.quantization.checkpoint import quantization_record
    from lorafleet.quantization.methods import QuantizationError

    try:
        record = quantization_record(model_dir)
        method = str(record["method"]) if record else None
    except (QuantizationError, KeyError) as exc:
        raise RegistryError(f"{model_dir}: not a valid quantization record: {exc}") from None
    if method is None:
        return {}
    fields: dict[str, Any] = {"method": f"quantized-{method}", "quantization": record}
    if record.get("run_id"):
        fields["run_id"] = record["run_id"]
    evaluation = record.get("eval") or {}
    fields["metrics"] = {
        f"quantized_{key}": float(evaluation[key]) for key in ("perplexity", "perplexity_ratio") if key in evaluation
    }
    return fields


def publish_run(
    storage_uri: str | Path | None,
    run: str | Path,
    *,
    name: str,
    merged: bool = False,
    profile: ServingProfile | None = None,
    profile_source: str = "the target profile",
) -> AdapterVersion:
    """Publish a run's `adapter/` (or, with `merged`, its `merged/` folder).

    `run` is a run folder, a run id under `<storage>/runs/`, or an adapter folder made elsewhere.
    """
    registry = Registry.open(storage_uri)
    validate_name(name)
    run_dir = find_run_dir(run, registry.location)
    if merged:
        if profile is not None:
            raise InvalidReference("--target checks adapters; a merged model is served as a base of its own")
        model_dir = run_dir / MERGED_DIR if (run_dir / MERGED_DIR / "config.json").is_file() else run_dir
        run_info_dir = run_dir if (run_dir / RECORD_FILE).is_file() or (run_dir / CONFIG_FILE).is_file() else None
        return publish_merged(storage_uri, name, model_dir, run_dir=run_info_dir)
    if (run_dir / ADAPTER_CONFIG).exists():  # an adapter folder made elsewhere: no run provenance
        return publish_adapter(storage_uri, name, run_dir, profile=profile, profile_source=profile_source)
    adapter_dir = run_dir / ADAPTER_DIR
    if not adapter_dir.is_dir():
        raise RegistryError(f"{run_dir} has no adapter/ folder: did the run finish? (see {run_dir / RECORD_FILE})")
    return publish_adapter(
        storage_uri, name, adapter_dir, run_dir=run_dir, profile=profile, profile_source=profile_source
    )


def _publish_files(
    registry: Registry, kind: Kind, name: str, files: list[tuple[str, Path]], fields: dict[str, Any], *, source: Path
) -> AdapterVersion:
    name_dir = registry.name_dir(name, kind)
    read_aliases(registry, name, kind)  # a corrupt aliases.json is refused before any version is claimed
    name_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(name_dir)
    _refuse_links(source, files)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=name_dir))
    os.chmod(staging, VERSION_DIR_MODE)  # mkdtemp makes it owner-only; serving may run as another user
    try:
        for relative, path in files:
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        digests = digest_tree(staging)  # what is hashed is the staged copy: exactly what readers get
        fsync_tree(staging)
        history = [
            *fields.pop("history", []),
            {"event": "published", "at": utc_now(), "by": user_at_host(), "source": str(source)},
        ]
        version = _claim_version(registry, kind, name, staging, fields | {"history": history, "files": digests})
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    refresh_latest(registry, name, kind)
    path = name_dir / version.version
    return AdapterVersion(name=name, version=version.version, kind=kind, path=path, manifest=version)


def _refuse_links(source: Path, files: list[tuple[str, Path]]) -> None:
    """Nothing that is a link, or lies outside the source folder, is copied into the registry (never a target)."""
    if source.is_symlink():
        raise RegistryError(f"{source} is a symbolic link (to {source.resolve()}): publish the folder itself")
    root = source.resolve()
    for _, path in files:
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            raise RegistryError(
                f"{path} is a symbolic link (to {path.resolve()}): the registry copies only regular files of "
                f"{source}; replace the link with the file itself"
            )


def _claim_version(registry: Registry, kind: Kind, name: str, staging: Path, fields: dict[str, Any]) -> Manifest:
    name_dir = staging.parent
    floor = 1
    for _ in range(MAX_CLAIM_ATTEMPTS):
        number = max(registry.next_number(name, kind), floor)
        manifest = Manifest(name=name, version=f"v{number}", created_at=utc_now(), **fields)
        _write_synced(staging / MANIFEST, manifest.to_json())  # staging is private: no need for a temp name
        if registry.remote is not None:  # the object store first: the mirror only ever holds visible versions
            if not registry.remote.claim(kind, name, manifest.version):
                floor = number + 1  # another publisher won this number on the object store
                continue
            registry.remote.push_version(kind, name, manifest.version, staging)  # visible once its manifest is
        try:
            os.rename(staging, name_dir / manifest.version)
        except OSError as exc:
            if exc.errno not in TAKEN_ERRNOS:
                raise
            if registry.remote is not None:
                return manifest  # a reader on this machine already fetched it into the mirror
            floor = number + 1  # another publisher won this number
            continue
        fsync_dir(name_dir)
        return manifest
    raise RegistryError(f"could not claim a version for {name} after {MAX_CLAIM_ATTEMPTS} attempts")


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(path.parent)


def _remove_leftovers(name_dir: Path) -> None:
    """Delete staging folders of publishes killed long ago (and unpublished versions left half-deleted)."""
    cutoff = time.time() - STALE_AFTER_S
    for entry in name_dir.iterdir():
        if entry.name.startswith((STAGING_PREFIX, UNPUBLISHED_PREFIX)) and entry.is_dir():
            try:
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:
                pass  # another publisher cleaned it first


def unpublish(storage_uri: str | Path | None, reference: str, *, kind: Kind = "adapters", force: bool = False) -> str:
    """Remove `NAME@vN` atomically (renamed out of sight, then deleted); its number is never reused.

    Refused while an alias other than `latest` points at it, unless `force` (which removes that alias).
    """
    registry = Registry.open(storage_uri)
    ref = parse_reference(reference, default="")
    if not ref.is_version:
        raise InvalidReference(f"unpublish needs an explicit version, e.g. {ref.name}@v3 (got {reference!r})")
    version = resolve_version(registry, ref, kind)
    name_dir = registry.name_dir(ref.name, kind)
    with editing_aliases(registry, ref.name, kind) as state:
        pointing = sorted(a for a, v in state.aliases.items() if v == version and a != LATEST)
        if pointing and not force:
            raise RegistryError(
                f"{ref} is what {', '.join(pointing)} point(s) at: promote another version first or --force"
            )
        if registry.remote is not None:
            registry.remote.retire_version(kind, ref.name, version)
        write_text_atomic(name_dir / RETIRED_DIR / version, json.dumps({"at": utc_now(), "by": user_at_host()}) + "\n")
        retired = Path(tempfile.mkdtemp(prefix=f"{UNPUBLISHED_PREFIX}{version}-", dir=name_dir))
        os.rename(name_dir / version, retired / version)
        fsync_dir(name_dir)
        for alias in pointing:
            state.record("unpublish", alias, None, reason=f"{version} unpublished with --force")
    shutil.rmtree(retired, ignore_errors=True)
    refresh_latest(registry, ref.name, kind, action="unpublish")
    return version
