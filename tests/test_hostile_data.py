"""Broken data files: the error names file:line (not a byte offset), an empty file is an error, not "0 rows, all
valid", and the errors survive pickling (Ray hands workers' exceptions to the driver that way)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from lorafleet.errors import ConfigError, DataError, Problem
from tests.helpers import run_cli

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
