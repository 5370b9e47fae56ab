"""The run folder: its layout, its id, and the record `run.json`, written and read only here.

`<storage>/runs/<run-id>/`:
    config.yaml        the resolved job config (the run's only input)
    checkpoints/       Ray Train's checkpoints (adapter + optimizer + scheduler + RNG + trainer state)
    metrics.jsonl      one record per log event (`train_begin` with `resumed: true` marks each restart)
    tensorboard/       event files (wandb/, mlruns/ when those sinks are listed)
    deepspeed.json     the DeepSpeed config the workers used (strategy: deepspeed)
    adapter/           the final adapter in PEFT format, plus the tokenizer
    report/            eval.json, eval.md, plots, loss.png
    merged/            `lorafleet merge`'s default output
    run.json           the RunRecord: status, steps, losses, timings, data hash (or the error)

Storage may be a local path or an object store URI (s3://...); training writes either. The commands that
read a finished run (eval, merge, publish) work on a local copy of an object-store run (all but its
checkpoints, `$LORAFLEET_HOME/object-runs/...`) and upload what they write (report/, merged/) back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lorafleet.config import JobConfig
from lorafleet.errors import LorafleetError
from lorafleet.names import is_valid_run_id
from lorafleet.object_store import ObjectFolder, S3Location, is_s3_uri
from lorafleet.paths import home
from lorafleet.storage import COMPLETE_MARKER, StorageFolder, StorageRoot, upload_dir

CONFIG_FILE = "config.yaml"
RECORD_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
DEEPSPEED_FILE = "deepspeed.json"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
REPORT_DIR = "report"
MERGED_DIR = "merged"
ORIGIN_FILE = ".lorafleet-origin"  # in a local copy of an object-store run: the run's URI


class RunNotFound(LorafleetError):
    """A run that cannot be opened as asked (bad id, missing folder, unfinished)."""

    exit_code = 2


def new_run_id(job_name: str) -> str:
    return f"{job_name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def validate_run_id(run_id: str) -> str:
    if not is_valid_run_id(run_id):
        raise LorafleetError(f"run id {run_id!r} is invalid: use lowercase letters, digits, '.', '_' and '-'")
    return run_id


class DataRecord(BaseModel):
    """What training saw of its data: per-split token statistics and the records' content hash."""

    model_config = ConfigDict(extra="forbid")

    train: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    data_hash: str = ""


class SweepTrial(BaseModel):
    """A run that is a trial of a sweep: the sweep, the trial's number and the values it was given."""

    model_config = ConfigDict(extra="forbid")

    sweep_id: str
    trial: int
    parameters: dict[str, Any]
    metric: str


class RunRecord(BaseModel):
    """`run.json`: how a run ended. A failed run has `error`; a succeeded one its steps, loss and adapter;
    a stopped one (a sweep's scheduler stopped it early) the adapter of its last checkpoint."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    status: Literal["succeeded", "stopped", "failed"]
    error: str | None = None
    run_dir: str | None = None
    global_step: int | None = None
    train_loss: float | None = None
    adapter_dir: str | None = None
    seconds: float | None = None
    config_hash: str | None = None
    data: DataRecord | None = None
    sweep: SweepTrial | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def data_hash(self) -> str | None:
        return (self.data.data_hash if self.data else None) or None


class RunFolder(StorageFolder):
    """One run's folder at a storage URI (a local path or an object store), read and written by name."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.run_id = self.uri.rsplit("/", 1)[-1]

    @classmethod
    def of(cls, storage_uri: str, run_id: str) -> RunFolder:
        return cls(StorageRoot(storage_uri).run_dir(validate_run_id(run_id)))

    @property
    def adapter_uri(self) -> str:
        return f"{self.uri}/{ADAPTER_DIR}"

    def config_text(self) -> str | None:
        return self.read_text(CONFIG_FILE)

    def read_config(self) -> JobConfig | None:
        """The saved config read with today's schema (new keys take their defaults); None if there is none."""
        text = self.config_text()
        if text is None:
            return None
        try:
            return JobConfig.model_validate(yaml.safe_load(text))
        except (ValidationError, yaml.YAMLError) as exc:
            raise LorafleetError(f"{self.uri}/{CONFIG_FILE} is not a valid job config any more: {exc}") from None

    def write_config(self, job: JobConfig) -> None:
        self.write_text(CONFIG_FILE, job.to_yaml())

    def read_record(self) -> RunRecord | None:
        text = self.read_text(RECORD_FILE)
        if text is None:
            return None
        try:
            return RunRecord.model_validate_json(text)
        except ValidationError as exc:
            raise LorafleetError(f"{self.uri}/{RECORD_FILE} is not a run record: {exc}") from None

    def write_record(self, record: RunRecord) -> None:
        self.write_text(RECORD_FILE, record.model_dump_json(indent=2, exclude_none=True) + "\n")


@dataclass(frozen=True)
class FinishedRun:
    """A run on local storage that has its config and its adapter: what eval, merge and publish read."""

    path: Path
    job: JobConfig
    record: RunRecord | None

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def folder(self) -> RunFolder:
        return RunFolder(str(self.path))

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIR

    @property
    def merged_dir(self) -> Path:
        return self.path / MERGED_DIR

    def adapter_config(self) -> dict:
        return json.loads((self.adapter_dir / "adapter_config.json").read_text())

    def eval_report(self) -> dict | None:
        path = self.report_dir / "eval.json"
        return json.loads(path.read_text()) if path.is_file() else None


def find_run_dir(run: str | Path, storage_uri: str | None = None) -> Path:
    """A run given as a folder, or as a run id under `<storage>/runs/` (default storage: the local cache)."""
    from lorafleet.paths import default_storage_uri

    as_path = Path(run).expanduser()
    if as_path.is_dir():
        return as_path.resolve()
    if not is_valid_run_id(str(run)):
        raise RunNotFound(f"{str(run)!r} is neither a run folder nor a valid run id (lowercase, digits, . _ -)")
    if is_s3_uri(str(run)):
        return copy_of_run(str(run))
    root = StorageRoot(storage_uri or default_storage_uri())
    if is_s3_uri(root.uri):
        return copy_of_run(root.run_dir(str(run)))
    if not root.is_local:
        raise RunNotFound(f"{root.uri}: runs are read from a path or from s3://")
    path = root.local_path / "runs" / str(run)
    if not path.is_dir():
        raise RunNotFound(f"no run {str(run)!r}: {path} does not exist (pass --storage or the run folder)")
    return path


def copy_of_run(uri: str) -> Path:
    """The run at an object-store URI, without its checkpoints, in a local folder (refreshed at each call); an
    adapter/ or merged/ whose upload did not finish (no completion marker) is left out."""
    store = ObjectFolder(S3Location.parse(uri))
    objects = list(store.list(""))
    if not any(item.key == CONFIG_FILE for item in objects):
        raise RunNotFound(f"no run at {uri} (no {CONFIG_FILE})")
    complete = {item.key.split("/")[0] for item in objects if item.key.endswith(f"/{COMPLETE_MARKER}")}
    target = home() / "object-runs" / store.location.bucket / store.location.key
    for item in objects:
        top = item.key.split("/")[0]
        if top == CHECKPOINTS_DIR or (top in (ADAPTER_DIR, MERGED_DIR) and top not in complete):
            continue
        fetched = target / item.key
        if top == MERGED_DIR and fetched.is_file() and fetched.stat().st_size == item.size:
            continue  # a merged model is written once; its large files are not fetched again
        store.download_into(item.key, target)
    (target / ORIGIN_FILE).write_text(uri + "\n")
    return target


def push_run_part(run_dir: Path, part: str) -> None:
    """Upload `part` (report/, merged/) of a local copy of an object-store run back to the run; no-op locally."""
    origin = run_dir / ORIGIN_FILE
    if origin.is_file() and (run_dir / part).is_dir():
        upload_dir(run_dir / part, f"{origin.read_text().strip()}/{part}")


def open_run(run: str | Path, storage_uri: str | None = None) -> FinishedRun:
    """A finished run (config + adapter) given as a folder or a run id."""
    path = find_run_dir(run, storage_uri)
    folder = RunFolder(str(path))
    job = folder.read_config()
    if job is None:
        raise RunNotFound(f"{path} is not a run folder: it has no {CONFIG_FILE}")
    if not (path / ADAPTER_DIR / "adapter_config.json").is_file():
        raise LorafleetError(f"run {path.name} has no adapter/adapter_config.json: did it finish? (see {RECORD_FILE})")
    return FinishedRun(path=path, job=job, record=folder.read_record())


def is_finished(run_dir: Path) -> bool:
    """A run that succeeded and left its adapter (a run to reuse rather than train again)."""
    record = RunFolder(str(run_dir)).read_record()
    return record is not None and record.succeeded and (run_dir / ADAPTER_DIR / "adapter_config.json").is_file()


def data_hash(run: FinishedRun) -> str | None:
    """The run's data hash: the one training recorded, else sha256 of its local data files."""
    if run.record is not None and run.record.data_hash:
        return run.record.data_hash
    digest = hashlib.sha256()
    for reference in filter(None, (run.job.data.train, run.job.data.eval)):
        path = _data_file(reference)
        if path is None:
            return None  # a hub dataset: its revision, not a file, identifies it
        digest.update(reference.encode() + b"\0" + hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def _data_file(reference: str) -> Path | None:
    if reference.startswith("builtin:"):
        from lorafleet.demo_data import resolve_builtin_dataset

        return resolve_builtin_dataset(reference)
    path = Path(reference)
    return path if path.is_file() else None
