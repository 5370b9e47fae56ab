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
    "nested 5000 deep (jsonl)": (
        "train.jsonl",
        GOOD + b'{"instruction": ' + b"[" * 5000 + b"]" * 5000 + b', "output": "x"}\n',
        ":2: invalid JSON: nested deeper than 64 levels",
    ),
    "a 5000-digit integer (jsonl)": (
        "train.jsonl",
        GOOD + b'{"instruction": 1' + b"0" * 5000 + b', "output": "x"}\n',
        ":2: invalid JSON: a number is too large",
    ),
    "NaN (jsonl)": ("train.jsonl", GOOD + b'{"instruction": NaN, "output": "x"}\n', ":2: invalid JSON: NaN"),
    "nested 5000 deep (json array)": (
        "train.json",
        b'[{"instruction": ' + b"[" * 5000 + b"]" * 5000 + b', "output": "x"}]',
        "invalid JSON: nested deeper than",
    ),
    "a csv field over 8 MiB": (
        "train.csv",
        b"instruction,output\nok,x\n" + b"y" * (8 * 2**20 + 10) + b",x\n",
        ":3: the line is longer than 8 MiB",
    ),
    "an unterminated csv quote": (
        "train.csv",
        b'instruction,output\nok,x\n"never closed,x\nmore,x\n',
        ":3: a quoted field is never closed",
    ),
    "a json line over 8 MiB": (
        "train.jsonl",
        GOOD + b'{"instruction": "' + b"y" * (8 * 2**20) + b'", "output": "x"}\n',
        ":2: the line is longer than 8 MiB",
    ),
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

    from lorafleet.training.worker_errors import lorafleet_cause

    ours = DataError("train.jsonl", [Problem("train.jsonl:4", "field 'output': missing")])
    wrapped = RayTaskError("train_loop", "Traceback ...", ours)
    failure = pickle.loads(pickle.dumps(WorkerGroupError("Training failed", {0: wrapped, 1: RuntimeError("peer")})))
    found = lorafleet_cause(failure)
    assert isinstance(found, DataError) and str(found) == str(ours)
    assert lorafleet_cause(RuntimeError("not ours")) is None and lorafleet_cause("a string") is None


def test_a_csv_field_past_the_csv_module_default_is_a_row_like_any_other(tmp_path: Path) -> None:
    """Python's csv stops at 131072 characters a field by default; a 200 000-character instruction is valid."""
    path = tmp_path / "train.csv"
    path.write_bytes(b"instruction,output\n" + b"y" * 200_000 + b",x\nshort,x\n")
    result = run_cli("data", "check", str(path), "--format", "alpaca", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rows" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_data_path_that_is_not_a_regular_file_says_so(tmp_path: Path, kind: str) -> None:
    import os

    path = tmp_path / "train.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    # A FIFO or /dev/zero that is read blocks or never ends: the timeout would fail the test.
    result = run_cli("data", "check", str(path), "--format", "alpaca", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    words = "is a directory" if kind == "directory" else "not a regular file"
    assert words in result.stderr and "not found" not in result.stderr, result.stderr


def test_a_200_mb_single_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    """Rows are read a line at a time, each at most 8 MiB: the check's peak memory stays far below the file."""
    import subprocess
    import sys

    path = tmp_path / "train.jsonl"
    with open(path, "wb") as handle:
        handle.write(GOOD + b'{"instruction": "')
        for _ in range(200):
            handle.write(b"y" * 2**20)
        handle.write(b'", "output": "x"}\n' + GOOD)
    probe = (
        "import resource, subprocess, sys;"
        "r = subprocess.run([sys.executable, '-c', 'from lorafleet.cli import main; main()', 'data', 'check',"
        f" {str(path)!r}, '--format', 'alpaca'], capture_output=True, text=True);"
        "print(r.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO)
    code, peak_kib, stderr = result.stdout.split("\n", 2)
    assert code == "2", stderr
    assert f"{path}:2: the line is longer than 8 MiB" in stderr and "Traceback" not in stderr, stderr
    assert int(peak_kib) < 1_000_000, f"peak RSS {int(peak_kib) // 1024} MiB for a 200 MiB line"
