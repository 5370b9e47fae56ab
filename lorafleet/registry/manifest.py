"""`manifest.json`: what a registry version is, where it came from, and the sha256 of every file in it.

Also the fingerprints that tie an adapter to the base it was trained on: `base_fingerprint(model_dir)` hashes
the base's config and tokenizer files (chat template included), `tokenizer_fingerprint(folder)` the
tokenizer files alone (what a serving profile's `tokenizer_hash` is compared with).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.registry.layout import RegistryError

MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Keys of config.json that change with the library that saved it, not with the model.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")
PREFERRED_METRIC_SECTIONS = ("finetuned", "fine_tuned", "adapter", "tuned", "metrics")


class FileDigest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    size: int


class Manifest(BaseModel):
    """Written once at publish time, never changed. Unknown keys are kept (newer writers may add some)."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = 1
    kind: Literal["adapter", "model"]
    name: str
    version: str
    created_at: str
    base_model: str | None = Field(None, description="`base_model_name_or_path` of the adapter (what vLLM matches).")
    base_model_revision: str | None = None
    base_fingerprint: str | None = Field(None, description="sha256 of the base's config + tokenizer files.")
    tokenizer_fingerprint: str | None = Field(None, description="sha256 of the tokenizer files served with it.")
    method: str | None = Field(None, description="lora, dora, prefix_tuning, p_tuning, prompt_tuning, ia3, ...")
    peft_type: str | None = None
    rank: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    run_id: str | None = None
    config_hash: str | None = None
    data_hash: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    parents: list[str] = Field(default_factory=list, description="`name@vN` of the versions this was composed from.")
    composition: dict[str, Any] | None = None
    sweep: dict[str, Any] | None = Field(
        None, description="The sweep trial it came from: sweep_id, trial, parameters, metric."
    )
    quantization: dict[str, Any] | None = Field(
        None, description="A quantized model's method, source, calibration sha256 and eval numbers."
    )
    history: list[dict[str, Any]] = Field(
        default_factory=list, description="How it was made: trained, composed, published."
    )
    files: dict[str, FileDigest]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise RegistryError(f"{path} is missing: the version is corrupt (run `lorafleet registry verify`)") from None
    except ValidationError as exc:
        raise RegistryError(f"{path} is not a valid manifest: {exc.errors()[0]['msg']}") from None


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def user_at_host() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class HashCache:
    """sha256 of files that have not changed since they were last hashed, so every load can verify cheaply.

    The key is what changes when a file is rewritten, replaced or touched: real path, size, inode, mtime and
    ctime (ctime cannot be set back by a user). Any change means a fresh hash.
    """

    def __init__(self, limit: int = 4096):
        self._known: dict[tuple[str, int, int, int, int], str] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def sha256(self, path: Path) -> str:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is not None:
            return known
        digest = sha256_file(path)
        with self._lock:
            if len(self._known) >= self._limit:
                self._known.clear()
            self._known[key] = digest
        return digest


HASHES = HashCache()


def digest_tree(folder: Path) -> dict[str, FileDigest]:
    """sha256 and size of every file under `folder` (posix relative paths), manifest.json excepted."""
    digests: dict[str, FileDigest] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative != MANIFEST:
            digests[relative] = FileDigest(sha256=sha256_file(path), size=path.stat().st_size)
    return digests


def safe_relative(path_text: str) -> bool:
    """A manifest file entry must stay inside its version folder."""
    path = PurePosixPath(path_text)
    return bool(path_text) and not path.is_absolute() and ".." not in path.parts and "\\" not in path_text


def _combined_digest(parts: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(name.encode() + b"\0" + hashlib.sha256(parts[name]).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def tokenizer_fingerprint(folder: Path | str) -> str | None:
    """sha256 over the tokenizer files present in `folder` (chat template included); None if there are none."""
    folder = Path(folder)
    parts = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
    return _combined_digest(parts) if parts else None


def base_fingerprint(model_dir: Path | str) -> str:
    """sha256 over a base model's config.json (minus library-version keys) and its tokenizer files."""
    folder = Path(model_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise RegistryError(f"{folder} has no config.json: not a model folder")
    config = json.loads(config_path.read_text())
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    parts = {"config.json": json.dumps(config, sort_keys=True).encode()}
    parts |= {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
    return _combined_digest(parts)


def local_base_folder(base_model: str | None) -> Path | None:
    """The folder of a base given as a local path or an already provisioned `builtin:` name (never downloads)."""
    if not base_model:
        return None
    from lorafleet.models import ModelNotFound, resolve_model

    try:
        resolved = resolve_model(base_model, provision=False)
    except ModelNotFound:
        return None
    folder = Path(resolved)
    return folder if folder.is_absolute() and (folder / "config.json").is_file() else None


def adapter_facts(adapter_config: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields that come from `adapter_config.json`."""
    peft_type = str(adapter_config.get("peft_type") or "").upper() or None
    method = peft_type.lower() if peft_type else None
    if peft_type == "LORA" and adapter_config.get("use_dora"):
        method = "dora"
    rank = adapter_config.get("r")
    rank_pattern = adapter_config.get("rank_pattern") or {}
    if isinstance(rank, int) and rank_pattern:
        rank = max(rank, *rank_pattern.values())
    targets = adapter_config.get("target_modules")
    if isinstance(targets, list | tuple | set):
        targets = sorted(str(t) for t in targets)
    modules_to_save = adapter_config.get("modules_to_save")
    return {
        "base_model": adapter_config.get("base_model_name_or_path"),
        "base_model_revision": adapter_config.get("revision"),
        "method": method,
        "peft_type": peft_type,
        "rank": rank if isinstance(rank, int) else None,
        "lora_alpha": adapter_config.get("lora_alpha"),
        "target_modules": targets,
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
    }


def extract_metrics(report: Any) -> dict[str, float]:
    """Numbers of an eval report, flattened to dotted keys; those of its fine-tuned section also unprefixed.

    `{"base": {"mae": 30}, "finetuned": {"mae": 12}}` → `{"base.mae": 30, "finetuned.mae": 12, "mae": 12}`.
    """
    flat: dict[str, float] = {}
    _flatten(report, "", flat)
    if isinstance(report, dict):
        for section in PREFERRED_METRIC_SECTIONS:
            if isinstance(report.get(section), dict):
                preferred: dict[str, float] = {}
                _flatten(report[section], "", preferred)
                for key, value in preferred.items():
                    flat.setdefault(key, value)
                break
    return flat


def _flatten(node: Any, prefix: str, out: dict[str, float]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _flatten(value, f"{prefix}{key}.", out)
    elif isinstance(node, int | float) and not isinstance(node, bool) and math.isfinite(node):
        out[prefix.rstrip(".")] = float(node)
