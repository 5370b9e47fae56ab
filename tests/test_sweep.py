"""Sweeps on Ray Tune: the `sweep:` section validated against the job config, and real sweeps of the tiny model
on an embedded Ray (4 trials, 2 at a time, ASHA), published, killed with SIGKILL and resumed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorafleet.config import load_job_config
from lorafleet.errors import ConfigError
from lorafleet.sweep_trials import reported_metrics, trial_job
from tests.helpers import CONFIGS, REPO, run_cli

SWEEP_TINY = CONFIGS / "sweep-tiny.yaml"


def sweep_config(tmp_path: Path, sweep: dict, **training) -> Path:
    data = yaml.safe_load(SWEEP_TINY.read_text())
    data["sweep"] = sweep
    data["training"].update(training)
    data["storage"] = {"uri": str(tmp_path / "storage")}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- the sweep section ------------------------------------------------------------------------------


def test_a_trial_is_the_job_with_its_values_set_and_no_sweep() -> None:
    job = load_job_config(SWEEP_TINY)
    trial = trial_job(job, {"training.learning_rate": 1e-3, "adapter.r": 16})
    assert trial.sweep is None and job.sweep is not None
    assert trial.training.learning_rate == 1e-3 and trial.adapter.r == 16
    assert trial.training.save_steps == job.training.eval_steps  # a stopped trial keeps the adapter it was judged by
    assert trial.name == job.name and trial.model == job.model


def test_space_entries_straight_under_sweep_and_scheduler_by_name(tmp_path: Path) -> None:
    path = sweep_config(tmp_path, {"adapter.r": {"choice": [4, 8]}, "scheduler": "asha", "num_samples": 2})
    sweep = load_job_config(path).sweep
    assert list(sweep.space) == ["adapter.r"] and sweep.space["adapter.r"].values == [4, 8]
    assert sweep.scheduler is not None and sweep.scheduler.type == "asha" and sweep.num_samples == 2
    assert (
        load_job_config(sweep_config(tmp_path, {"adapter.r": {"grid": [4]}, "scheduler": "none"})).sweep.scheduler
        is None
    )


BAD_SWEEPS = {
    "unknown path": (
        {"space": {"adapter.rank": {"choice": [8, 16]}}},
        "sweep.space.adapter.rank",
        "no such config key",
    ),
    "unknown section": ({"space": {"trainer.lr": {"choice": [1]}}}, "sweep.space.trainer.lr", "no such config key"),
    "wrong type": ({"space": {"adapter.r": {"choice": [8, "sixteen"]}}}, "sweep.space.adapter.r", "'sixteen'"),
    "float for an int": (
        {"space": {"training.max_steps": {"uniform": [2, 10]}}},
        "sweep.space.training.max_steps",
        "integer",
    ),
    "out of range": ({"space": {"adapter.dropout": {"uniform": [0.0, 2.0]}}}, "sweep.space.adapter.dropout", "dropout"),
    "empty choice": ({"space": {"adapter.r": {"choice": []}}}, "sweep.space.adapter.r", "empty"),
    "empty space": ({"space": {}}, "sweep.space", "empty"),
    "unknown domain": ({"space": {"adapter.r": {"pick": [8]}}}, "sweep.space.adapter.r", "choice, grid"),
    "low above high": (
        {"space": {"training.learning_rate": {"loguniform": [1e-3, 1e-4]}}},
        "sweep.space",
        "low < high",
    ),
    "unreported metric": (
        {"space": {"adapter.r": {"choice": [8]}}, "metric": "train_loss"},
        "sweep.metric",
        "train_loss",
    ),
    "unknown scheduler": (
        {"space": {"adapter.r": {"choice": [8]}}, "scheduler": "hyperband"},
        "sweep.scheduler",
        "asha",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SWEEPS))
def test_bad_sweep_sections_exit_2_naming_the_key(tmp_path: Path, case: str) -> None:
    sweep, key, words = BAD_SWEEPS[case]
    path = sweep_config(tmp_path, sweep)
    result = run_cli("validate", str(path))
    assert result.returncode == 2, result.stderr
    assert key in result.stderr and words in result.stderr, result.stderr
    assert f"{path}:" in result.stderr  # file:line of the key


def test_a_scheduler_on_eval_metrics_needs_evaluations(tmp_path: Path) -> None:
    path = sweep_config(tmp_path, {"space": {"adapter.r": {"choice": [8]}}, "scheduler": "asha"}, eval_steps=None)
    with pytest.raises(ConfigError) as caught:
        load_job_config(path)
    text = str(caught.value)
    assert "sweep.metric" in text and "eval_steps" in text and "sweep.scheduler.grace_period" in text
    result = run_cli("sweep", str(path))  # the sweep command refuses it the same way, before Ray starts
    assert result.returncode == 2 and "sweep.metric" in result.stderr
    assert not (tmp_path / "storage" / "sweeps").exists()


def test_runs_report_train_metrics_always_and_eval_metrics_with_evaluations() -> None:
    job = load_job_config(SWEEP_TINY)
    assert {"loss", "eval_loss", "eval_perplexity"} <= set(reported_metrics(job))
    assert "eval_loss" not in reported_metrics(
        job.model_copy(update={"training": job.training.model_copy(update={"eval_steps": None})})
    )


def test_a_trial_tune_stopped_is_stopped_even_if_its_teardown_was_recorded_as_a_failure(tmp_path: Path) -> None:
    """Tune stops a trial by tearing its workers down; the run may record that as its failure before it dies."""
    from types import SimpleNamespace

    from lorafleet.runs import RunFolder, RunRecord
    from lorafleet.sweeps import SweepFolder
    from lorafleet.training.sweep_report import collect_trials

    job = load_job_config(sweep_config(tmp_path, {"space": {"training.learning_rate": {"grid": [0.1, 0.2]}}}))
    folder = SweepFolder.of(job.storage.uri, "s9")
    for trial, record_status in ((0, "failed"), (1, None)):
        run = RunFolder.of(job.storage.uri, folder.trial_run_id(trial))
        run.write_text("metrics.jsonl", json.dumps({"step": 2, "eval_loss": 5.0 + trial}) + "\n")
        if record_status:
            run.write_record(RunRecord(run_id=run.run_id, status=record_status, error="worker group shut down"))
    grid = [SimpleNamespace(path=f"{folder.tune_uri}/t{trial}", config={"lr": trial}, error=None) for trial in (0, 1)]
    rows = collect_trials(grid, job, folder)
    assert [row.status for row in rows] == ["stopped early", "stopped early"]
    for trial in (0, 1):
        record = RunFolder.of(job.storage.uri, folder.trial_run_id(trial)).read_record()
        assert record.status == "stopped" and record.global_step == 2 and record.sweep.trial == trial


# ---- real sweeps on an embedded Ray -------------------------------------------------------------------


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last_eval_loss(run_dir: Path) -> float:
    return [r["eval_loss"] for r in metrics_of(run_dir) if "eval_loss" in r][-1]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    storage = tmp_path_factory.mktemp("sweep") / "storage"
    result = run_cli(
        "sweep", str(SWEEP_TINY), "--set", f"storage.uri={storage}", "--sweep-id", "s1", "--publish", "tiny-best"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return storage, result


@pytest.mark.slow
def test_a_sweep_stops_bad_trials_and_reports_every_trial(swept) -> None:
    storage, result = swept
    folder = storage / "sweeps" / "s1"
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert [row["run_id"] for row in rows] == [f"s1-t{n}" for n in range(4)]
    assert any(row["status"] == "stopped early" for row in rows), rows
    assert any(row["status"] == "finished" for row in rows), rows
    for row in rows:  # the reports agree with each trial's own run folder
        run_dir = storage / "runs" / row["run_id"]
        assert float(row["eval_loss"]) == pytest.approx(last_eval_loss(run_dir))
        assert int(row["steps"]) == max(r["step"] for r in metrics_of(run_dir) if "step" in r)
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == {"finished": "succeeded", "stopped early": "stopped"}[row["status"]]
        assert record["sweep"]["parameters"] == {"training.learning_rate": float(row["training.learning_rate"])}
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["training"]["learning_rate"] == float(row["training.learning_rate"]) and config["sweep"] is None
    assert (folder / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "stopped early" in (folder / "results.md").read_text()
    best = json.loads((folder / "best.json").read_text())
    with_adapter = [r for r in rows if (storage / "runs" / r["run_id"] / "adapter" / "adapter_config.json").is_file()]
    assert best["run_id"] == min(with_adapter, key=lambda r: float(r["eval_loss"]))["run_id"]
    assert best["value"] == pytest.approx(float(min(with_adapter, key=lambda r: float(r["eval_loss"]))["eval_loss"]))
    assert f"best {best['run_id']}" in result.stdout and "stopped early" in result.stdout  # the live table


@pytest.mark.slow
def test_publish_puts_the_best_adapter_in_the_registry_with_its_lineage(swept, tiny_model_dir: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    storage, result = swept
    best = json.loads((storage / "sweeps" / "s1" / "best.json").read_text())
    version = storage / "adapters" / "tiny-best" / "v1"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["run_id"] == best["run_id"]
    assert manifest["sweep"] == {
        "sweep_id": "s1",
        "trial": best["trial"],
        "parameters": best["parameters"],
        "metric": "eval_loss",
    }
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(version))
    trained = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert trained and any(torch.count_nonzero(v) for v in trained.values())  # B starts at zero: it learned


@pytest.mark.slow
def test_a_failing_trial_is_reported_and_does_not_stop_the_sweep(tmp_path: Path) -> None:
    from lorafleet.models import resolve_model

    # A model folder that passes validation (config, tokenizer) and fails in its trial: it has no weights.
    missing = tmp_path / "no-such-model"
    shutil.copytree(resolve_model("builtin:tiny-llama"), missing, ignore=shutil.ignore_patterns("*.safetensors"))
    path = sweep_config(
        tmp_path,
        {"space": {"model.name_or_path": {"grid": ["builtin:tiny-llama", str(missing)]}}, "max_concurrent_trials": 2},
    )
    result = run_cli("sweep", str(path), "--sweep-id", "f1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {
        row["trial"]: row for row in csv.DictReader((tmp_path / "storage" / "sweeps" / "f1" / "results.csv").open())
    }
    assert rows["0"]["status"] == "finished" and rows["1"]["status"] == "failed"
    assert str(missing) in rows["1"]["error"] or "no-such-model" in rows["1"]["error"], rows["1"]
    assert json.loads((tmp_path / "storage" / "sweeps" / "f1" / "best.json").read_text())["run_id"] == "f1-t0"
    assert "1 finished, 0 stopped early, 1 failed" in result.stdout


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    driver = subprocess.Popen(
        [sys.executable, "-c", "from lorafleet.cli import main; main()", "sweep", str(SWEEP_TINY),
         "--set", f"storage.uri={storage}", "--sweep-id", "k1"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    first = storage / "runs" / "k1-t0" / "run.json"
    deadline = time.monotonic() + 600
    while not (first.is_file() and "succeeded" in first.read_text()):
        assert driver.poll() is None, "the sweep ended before a trial finished"
        assert time.monotonic() < deadline, "no trial finished in 10 minutes"
        time.sleep(0.5)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (storage / "sweeps" / "k1" / "results.csv").exists()  # killed before the end
    ended = {  # trials that ended before the kill: succeeded, or stopped by ASHA (whose record may be unfinished)
        p.parent.name: (json.loads(p.read_text())["status"], folder_digest(p.parent))
        for p in storage.glob("runs/*/run.json")
    }

    result = run_cli("sweep", "--resume", "k1", "--storage", str(storage))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for run_id, (status, digest) in ended.items():
        after = folder_digest(storage / "runs" / run_id)
        if status == "succeeded":
            assert after == digest, f"{run_id} was touched by the resumed sweep"
        else:  # the report completes a stopped trial's record and adapter; nothing of it trains again
            trained = {name: sha for name, sha in digest.items() if name.startswith(("checkpoints/", "metrics"))}
            assert {name: after.get(name) for name in trained} == trained, f"{run_id} trained again"
    rows = list(csv.DictReader((storage / "sweeps" / "k1" / "results.csv").open()))
    assert len(rows) == 4 and all(row["status"] in ("finished", "stopped early") for row in rows), rows
    for row in rows:
        assert (storage / "runs" / row["run_id"] / "run.json").is_file()


# ---- on a cluster -------------------------------------------------------------------------------------


def test_the_rayjob_of_a_sweep_runs_the_sweep_and_passes_the_crd_schema(tmp_path: Path) -> None:
    from lorafleet.cluster_options import ClusterOptions
    from lorafleet.kuberay import render_rayjob
    from tests.test_kuberay import all_errors

    job = load_job_config(SWEEP_TINY, ["storage.uri=/srv/lorafleet", "distributed.num_workers=2"])
    body = render_rayjob(job, "tiny-sweep-1", ClusterOptions(image="registry.example/lorafleet:0.1.0"))
    assert all_errors(body) == []
    workers = body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == 2 * 2  # 2 trials at once x 2 workers each
    assert (
        "exec lorafleet sweep /tmp/lorafleet/tiny-sweep-1.yaml --sweep-id tiny-sweep-1 --address auto"
        in (body["spec"]["entrypoint"])
    )
    printed = run_cli("render", "rayjob", str(SWEEP_TINY), "--set", "storage.uri=s3://bucket/lf", "--run-id", "sw-2")
    assert printed.returncode == 0, printed.stderr
    rendered = yaml.safe_load(printed.stdout)
    assert all_errors(rendered) == [] and "lorafleet sweep" in rendered["spec"]["entrypoint"]


def test_ray_jobs_submission_of_a_sweep_runs_lorafleet_sweep(tmp_path: Path) -> None:
    from lorafleet.jobs import RayJobs, submission_run_id

    seen = {}

    class Recorder:  # stands in for Ray's JobSubmissionClient: what reaches submit_job
        def submit_job(self, **kwargs):
            seen.update(kwargs)
            return kwargs["submission_id"]

    jobs = RayJobs.__new__(RayJobs)
    jobs.address, jobs.client, jobs._errors = "http://head:8265", Recorder(), (RuntimeError,)
    job = load_job_config(SWEEP_TINY, [f"storage.uri={tmp_path}"])
    sweep_id = submission_run_id(job, None)
    assert sweep_id.startswith("tiny-sweep-")
    jobs.submit(job, sweep_id, {})
    assert seen["entrypoint"] == f"lorafleet sweep job.yaml --sweep-id {sweep_id} --address auto"
    no_sweep = run_cli("submit", str(CONFIGS / "tiny.yaml"), "--sweep", "--address", "http://127.0.0.1:1")
    assert no_sweep.returncode == 1 and "no sweep: section" in no_sweep.stderr
