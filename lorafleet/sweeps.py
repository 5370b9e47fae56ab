"""The sweep folder: its layout and its id, written and read only here.

`<storage>/sweeps/<sweep-id>/`:
    config.yaml     the resolved job config with its `sweep:` section (what `--resume` continues)
    tune/           Ray Tune's experiment state (what `Tuner.restore` reads)
    logs/train.log  every line the trials and Ray printed
    results.csv     one row per trial: status, parameters, steps, metric (last and best), error
    results.md      the same as a table, best trial first
    sweep.png       the metric against each parameter, and every trial's eval curve
    best.json       the best trial: run id, metric, parameters, adapter folder

Each trial is a normal run, `<storage>/runs/<sweep-id>-t<N>/`, with its own checkpoints, metrics and adapter.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lorafleet.config import JobConfig
from lorafleet.errors import LorafleetError
from lorafleet.runs import RunNotFound, new_run_id, validate_run_id
from lorafleet.storage import StorageFolder, StorageRoot

CONFIG_FILE = "config.yaml"
TUNE_DIR = "tune"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
PLOT_FILE = "sweep.png"
BEST_FILE = "best.json"


class BestTrial(BaseModel):
    """`best.json`: the trial whose metric is best at its last report (the value its adapter has)."""

    model_config = ConfigDict(extra="forbid")

    sweep_id: str
    trial: int
    run_id: str
    status: str
    metric: str
    mode: str
    value: float
    parameters: dict[str, Any]
    run_dir: str
    adapter_dir: str


class SweepFolder(StorageFolder):
    def __init__(self, uri: str):
        super().__init__(uri)
        self.sweep_id = self.uri.rsplit("/", 1)[-1]

    @classmethod
    def of(cls, storage_uri: str, sweep_id: str) -> SweepFolder:
        return cls(StorageRoot(storage_uri).join("sweeps", validate_run_id(sweep_id)))

    @property
    def tune_uri(self) -> str:
        return f"{self.uri}/{TUNE_DIR}"

    def trial_run_id(self, trial: int) -> str:
        return f"{self.sweep_id}-t{trial}"

    def read_config(self) -> JobConfig:
        text = self.read_text(CONFIG_FILE)
        if text is None:
            raise RunNotFound(f"no sweep {self.sweep_id!r}: {self.uri}/{CONFIG_FILE} does not exist")
        try:
            return JobConfig.model_validate(yaml.safe_load(text))
        except (ValidationError, yaml.YAMLError) as exc:
            raise LorafleetError(f"{self.uri}/{CONFIG_FILE} is not a valid sweep config any more: {exc}") from None

    def write_config(self, job: JobConfig) -> None:
        self.write_text(CONFIG_FILE, job.to_yaml())

    def read_best(self) -> BestTrial | None:
        text = self.read_text(BEST_FILE)
        return BestTrial.model_validate_json(text) if text is not None else None

    def write_best(self, best: BestTrial) -> None:
        self.write_text(BEST_FILE, json.dumps(best.model_dump(), indent=2) + "\n")


def new_sweep_id(job_name: str) -> str:
    return new_run_id(f"{job_name}-sweep")
