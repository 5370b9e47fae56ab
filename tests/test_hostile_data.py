"""Broken data files: the error names file:line (not a byte offset), an empty file is an error, not "0 rows, all
valid", and the errors survive pickling (Ray hands workers' exceptions to the driver that way)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from lorafleet.errors import ConfigError, DataError, Problem
from tests.helpers import REPO, run_cli

GOOD = b'{"instruction": "Say hi", "output": "hi"}\n'

CASES = {
    "latin-1 on line 3 (jsonl)": (
        "train.jsonl",
        GOOD * 2 + b'{"instruction": "caf\xe9", "output": "x"}\n',
        ":3: not UTF-8 text (byte 0xe9)",
    ),
    "latin-1 on line 2 (csv)": ("train.csv", b"instruction,output\nna\xefve,x\n", ":2: not UTF-8 text (byte 0xef)"),
    "empty jsonl": ("train.jsonl", b"", "the file has no rows"),
    "blank lines only": ("train.jsonl", b"\n\n  \n", "the file has no rows"),
    "header only csv": ("train.csv", b"instruction,output\n", "the file has no rows"),
    "empty json array": ("train.json", b"[]", "the file has no rows"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_data_file_is_refused_by_data_check_naming_its_line(tmp_path: Path, case: str) -> None:
    name, content, expected = CASES[case]
    path = tmp_path / name
    path.write_bytes(content)
    result = run_cli("data", "check", str(path), "--format", "alpaca", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    located = f"{path}{expected}" if expected.startswith(":") else f"{path}: {expected}"
    assert located in result.stderr, result.stderr
    assert "0 rows" not in result.stdout and "Traceback" not in result.stderr


def test_errors_cross_pickling_intact() -> None:
    problems = [Problem("train.jsonl:4", "field 'output': empty")]
    for error in (DataError("train.jsonl", problems, total_bad=7), ConfigError("job.yaml", problems)):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error) and again.problems == problems


def _job(tmp_path: Path, train: Path, **data: object) -> Path:
    import yaml

    job = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    job["data"] = {"train": str(train), "format": "alpaca", "val_split": 0, **data}
    job["training"]["max_steps"] = 1
    job["distributed"] = {"num_workers": 1, "resources_per_worker": {"CPU": 1}, "strategy": "ddp"}
    job["storage"] = {"uri": str(tmp_path / "storage")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_train_refuses_bad_rows_on_the_driver_with_the_data_check_message(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_bytes(GOOD * 3 + b'{"instruction": "no output"}\n' + GOOD + b'{"instruction": 3, "output": "x"}\n')
    checked = run_cli("data", "check", str(train), "--format", "alpaca", timeout=120)
    trained = run_cli("train", str(_job(tmp_path, train)), timeout=300)
    assert checked.returncode == trained.returncode == 2, trained.stdout + trained.stderr
    for line in (f"{train}:4", f"{train}:6"):
        assert line in checked.stderr and line in trained.stderr, trained.stderr
    assert "Traceback" not in trained.stderr and "TypeError" not in trained.stderr
    assert "ray" not in trained.stderr.lower(), "refused before any worker started"


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_an_error_a_worker_raises_reaches_the_cli_intact(tmp_path: Path, verbose: bool) -> None:
    """Only the workers tokenize: every row over max_seq_len leaves nothing to train on, found inside Ray."""
    train = tmp_path / "train.jsonl"
    train.write_bytes(GOOD * 8)
    trained = run_cli("train", str(_job(tmp_path, train, max_seq_len=8)), *(["--verbose"] * verbose), timeout=600)
    assert trained.returncode == 2, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert f"{train}: no trainable examples" in trained.stderr.splitlines()[-1], trained.stderr[-3000:]
    assert "TypeError" not in trained.stderr
    if verbose:
        assert "RayTrainWorker pid=" in trained.stderr + trained.stdout
    else:
        assert trained.stderr.count("\n") == 1, f"one line, the error; the rest is in the run log: {trained.stderr}"
    record = json.loads(next((tmp_path / "storage" / "runs").glob("*/run.json")).read_text())
    assert record["status"] == "failed" and "no trainable examples" in record["error"]


def test_the_worker_error_is_found_inside_rays_wrappers() -> None:
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from lorafleet.training.launcher import lorafleet_cause

    ours = DataError("train.jsonl", [Problem("train.jsonl:4", "field 'output': missing")])
    wrapped = RayTaskError("train_loop", "Traceback ...", ours)
    failure = pickle.loads(pickle.dumps(WorkerGroupError("Training failed", {0: wrapped, 1: RuntimeError("peer")})))
    found = lorafleet_cause(failure)
    assert isinstance(found, DataError) and str(found) == str(ours)
    assert lorafleet_cause(RuntimeError("not ours")) is None and lorafleet_cause("a string") is None
