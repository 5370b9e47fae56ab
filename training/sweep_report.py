"""What a sweep leaves: one row per trial (from Ray Tune's results and the trial's run folder), results.csv,
results.md and best.json in the sweep folder (sweep.png: training/sweep_plot.py).

Metric values come from each trial's own metrics.jsonl, so the reports agree with the run folders. A trial
the scheduler stopped gets the adapter of its last committed checkpoint and a run record with status
`stopped`, so it can be evaluated or published like any run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.config import JobConfig
from lorafleet.runs import METRICS_FILE, RunFolder, RunRecord, SweepTrial
from lorafleet.sweeps import RESULTS_CSV, RESULTS_MD, BestTrial, SweepFolder
from lorafleet.training.launcher import RAY_CHECKPOINT_SNAPSHOT, copy_adapter_out_of_checkpoint
from lorafleet.training.plots import latest_per_step
from lorafleet.training.reporting import latest_numbers

TRIAL_DIR = re.compile(r"^t(\d+)$")
STATUSES = ("finished", "stopped early", "failed")


@dataclass
class TrialRow:
    trial: int
    run_id: str
    status: str  # one of STATUSES
    parameters: dict[str, Any]
    steps: int | None = None
    last: float | None = None  # the metric at the trial's last report: the value its adapter has
    best: float | None = None  # the best value the trial reported
    error: str | None = None
    has_adapter: bool = False
    curve: list[tuple[int, float]] = field(default_factory=list)


def trial_number(trial_path: str) -> int:
    match = TRIAL_DIR.match(Path(trial_path).name)
    if match is None:
        raise ValueError(f"{trial_path} is not a trial folder of a lorafleet sweep")
    return int(match.group(1))


def collect_trials(grid, job: JobConfig, folder: SweepFolder) -> list[TrialRow]:
    """A row for every trial of Tune's ResultGrid, stopped trials given their adapter and record."""
    rows = []
    for result in grid:
        trial = trial_number(result.path)
        run = RunFolder.of(job.storage.uri, folder.trial_run_id(trial))
        values = {key: value for key, value in (result.config or {}).items()}
        record = run.read_record()
        if result.error is not None:  # the run's own record says it best, when the run got as far as writing one
            status = "failed"
            error = record.error if record is not None and record.error else _last_line(result.error)
        elif record is not None and record.status == "succeeded":
            status, error = "finished", None
        else:
            status, error = "stopped early", None
            # Tune stops a trial by tearing its workers down, which the run may have recorded as its failure
            if record is None or record.status != "stopped":
                record = finish_stopped_trial(
                    run,
                    job,
                    SweepTrial(sweep_id=folder.sweep_id, trial=trial, parameters=values, metric=job.sweep.metric),
                )
        rows.append(_row(trial, run, status, values, error, job.sweep.metric, job.sweep.mode))
    return sorted(rows, key=lambda row: row.trial)


def _last_line(error: BaseException) -> str:
    """The message of a trial's error: Ray's wrappers put the traceback first and the exception last."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def finish_stopped_trial(run: RunFolder, job: JobConfig, lineage: SweepTrial) -> RunRecord:
    """The adapter of the stopped trial's last committed checkpoint (if it saved one), and its record."""
    from ray.train import Checkpoint

    steps = [r["step"] for r in run_metrics(run) if isinstance(r.get("step"), int)]
    checkpoint = _last_checkpoint(run)
    adapter_dir = None
    if checkpoint is not None:
        copy_adapter_out_of_checkpoint(Checkpoint(checkpoint), run.adapter_uri, base_model=job.model.name_or_path)
        adapter_dir = run.adapter_uri
    record = RunRecord(
        run_id=run.run_id,
        status="stopped",
        run_dir=run.uri,
        global_step=max(steps) if steps else None,
        adapter_dir=adapter_dir,
        sweep=lineage,
    )
    run.write_record(record)
    return record


def _last_checkpoint(run: RunFolder) -> str | None:
    text = run.read_text(f"checkpoints/{RAY_CHECKPOINT_SNAPSHOT}")
    if text is None:
        return None
    names = [entry["checkpoint_dir_name"] for entry in json.loads(text).get("checkpoint_results", [])]
    return f"{run.uri}/checkpoints/{max(names)}" if names else None  # Ray names them by time


def run_metrics(run: RunFolder) -> list[dict]:
    return [json.loads(line) for line in (run.read_text(METRICS_FILE) or "").splitlines() if line.strip()]


def last_metrics(run: RunFolder) -> dict[str, Any]:
    """The step and the latest value of every number a run logged (what its last report to Tune held)."""
    metrics = latest_numbers(run_metrics(run))
    metrics.pop("time", None)
    return metrics


def _row(trial: int, run: RunFolder, status: str, values: dict, error: str | None, metric: str, mode: str):
    records = run_metrics(run)
    curve = latest_per_step(records, metric)
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    finite = [value for _, value in curve if isinstance(value, int | float) and math.isfinite(value)]
    pick = min if mode == "min" else max
    return TrialRow(
        trial=trial,
        run_id=run.run_id,
        status=status,
        parameters=values,
        steps=max(steps) if steps else None,
        last=curve[-1][1] if curve else None,
        best=pick(finite) if finite else None,
        error=error,
        has_adapter=run.read_text("adapter/adapter_config.json") is not None,
        curve=curve,
    )


def best_trial(rows: list[TrialRow], job: JobConfig, folder: SweepFolder) -> BestTrial | None:
    """The trial with the best metric at its last report, among those that left an adapter."""
    candidates = [r for r in rows if r.has_adapter and r.last is not None and math.isfinite(r.last)]
    if not candidates:
        return None
    sign = 1 if job.sweep.mode == "min" else -1
    best = min(candidates, key=lambda r: (sign * r.last, r.trial))
    run = RunFolder.of(job.storage.uri, best.run_id)
    return BestTrial(
        sweep_id=folder.sweep_id,
        trial=best.trial,
        run_id=best.run_id,
        status=best.status,
        metric=job.sweep.metric,
        mode=job.sweep.mode,
        value=best.last,
        parameters=best.parameters,
        run_dir=run.uri,
        adapter_dir=run.adapter_uri,
    )


def write_reports(rows: list[TrialRow], job: JobConfig, folder: SweepFolder) -> BestTrial | None:
    best = best_trial(rows, job, folder)
    if best is not None:
        folder.write_best(best)
    folder.write_text(RESULTS_CSV, results_csv(rows, job))
    folder.write_text(RESULTS_MD, results_md(rows, job, best, folder.sweep_id))
    return best


def _columns(job: JobConfig) -> list[str]:
    metric = job.sweep.metric
    return ["trial", "run_id", "status", *job.sweep.space, "steps", metric, f"best_{metric}", "error"]


def _cells(row: TrialRow, job: JobConfig) -> list[Any]:
    params = [row.parameters.get(path) for path in job.sweep.space]
    return [row.trial, row.run_id, row.status, *params, row.steps, row.last, row.best, row.error or ""]


def results_csv(rows: list[TrialRow], job: JobConfig) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_columns(job))
    for row in rows:
        writer.writerow(["" if cell is None else cell for cell in _cells(row, job)])
    return out.getvalue()


def _md(cell: Any) -> str:
    if cell is None:
        return ""
    if isinstance(cell, float):
        return f"{cell:.4g}"
    return str(cell).replace("|", "\\|").replace("\n", " ")


def results_md(rows: list[TrialRow], job: JobConfig, best: BestTrial | None, sweep_id: str) -> str:
    sweep = job.sweep
    counts = ", ".join(f"{sum(r.status == s for r in rows)} {s}" for s in STATUSES)
    lines = [
        f"# Sweep {sweep_id}",
        "",
        f"{len(rows)} trials ({counts}); metric `{sweep.metric}` ({sweep.mode}), "
        f"scheduler {'ASHA' if sweep.scheduler else 'none'}.",
        "",
        f"Best: **{best.run_id}** with {sweep.metric} {best.value:.4g} ({best.parameters})"
        if best
        else "Best: none (no trial left an adapter with a finite metric)",
        "",
        "| " + " | ".join(_columns(job)) + " |",
        "|" + "---|" * len(_columns(job)),
    ]
    ranked = sorted(rows, key=lambda r: (r.last is None, (r.last or 0) * (1 if sweep.mode == "min" else -1)))
    lines += ["| " + " | ".join(_md(c) for c in _cells(row, job)) + " |" for row in ranked]
    return "\n".join(lines) + "\n"
