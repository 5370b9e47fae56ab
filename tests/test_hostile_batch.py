"""`lorafleet batch` with hostile input files and killed runs: every non-blank input line ends in exactly one of
OUTPUT and OUTPUT.errors.jsonl, whatever was killed where and however many times it was resumed.

A real CPU server on 127.0.0.1 answers; kills are real SIGKILLs of `lorafleet batch` in one test, and in the
property test (many kill points) an in-process kill: the row writer tears its line in half and raises, the way a
process dies in the middle of a write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.serving import batch_rows
from lorafleet.serving.batch_inference import run_batch
from lorafleet.serving.batch_rows import BatchJob
from tests.helpers import BASE_ID, REPO, run_cli, tiny_serving_config, two_adapters

GREEDY = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
KINDS = {
    "ok": lambda i: json.dumps({"custom_id": f"r{i}", "model": "a", "prompt": f"row {i}", **GREEDY}),
    "no id": lambda i: json.dumps({"model": "b", "prompt": f"anonymous {i}", **GREEDY}),
    "duplicate id": lambda i: json.dumps({"custom_id": "r0", "model": "a", "prompt": "again", **GREEDY}),
    "unknown model": lambda i: json.dumps({"custom_id": f"m{i}", "model": "nope", "prompt": "x", **GREEDY}),
    "bad json": lambda i: '{"custom_id": "broken", "prompt": ',
    "unknown field": lambda i: json.dumps({"model": "a", "prompt": "x", "temprature": 1}),
    "blank": lambda i: "",
    "invalid utf-8": lambda i: b'{"model": "a", "prompt": "caf\xe9"}',
    "nested 5000 deep": lambda i: '{"model": "a", "prompt": "x", "user": ' + "[" * 5000 + "]" * 5000 + "}",
    "5000-digit integer": lambda i: '{"model": "a", "prompt": "x", "max_tokens": 1' + "0" * 5000 + "}",
}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from lorafleet.serving.app import create_app
    from lorafleet.serving.server import ServerThread

    root = two_adapters(tiny_model_dir, tmp_path_factory.mktemp("hostile-batch"))
    with ServerThread(create_app(tiny_serving_config(tiny_model_dir, root, max_tokens=8))) as running:
        yield running


def write_input(path: Path, kinds: list[str]) -> set[int]:
    lines = [KINDS["ok"](0)] + [KINDS[kind](i) for i, kind in enumerate(kinds, start=1)]
    lines = [line if isinstance(line, bytes) else line.encode() for line in lines]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return {number for number, line in enumerate(lines, start=1) if line.strip()}


def lines_in(path: Path) -> list[int]:
    if not path.is_file():
        return []
    return [json.loads(line)["line"] for line in path.read_text().splitlines() if line.strip()]


def lines_in_prefix(path: Path) -> list[str]:
    """The whole lines written so far (the last may be half-written while we look)."""
    return path.read_text().splitlines()[:-1] if path.is_file() else []


def assert_each_line_once(job: BatchJob, expected: set[int]) -> None:
    answered, failed = lines_in(job.output), lines_in(job.errors_path)
    every = sorted(answered + failed)
    assert every == sorted(expected), f"answered {sorted(answered)}, failed {sorted(failed)}"


def test_a_duplicate_custom_id_stays_in_the_errors_file_after_a_resume(server, tmp_path: Path) -> None:
    expected = write_input(tmp_path / "in.jsonl", ["ok", "duplicate id", "ok"])
    job = BatchJob(input=tmp_path / "in.jsonl", output=tmp_path / "out.jsonl", server=server.url, progress=False)
    first = run_batch(job)
    assert (first.ok, first.failed) == (3, 1)
    again = run_batch(job)  # everything answered is skipped; the duplicate is refused again, not lost
    assert (again.ok, again.skipped, again.failed) == (0, 3, 1)
    assert lines_in(job.errors_path) == [3] and "also on line 1" in job.errors_path.read_text()
    assert_each_line_once(job, expected)


def test_bad_lines_are_their_rows_errors_and_every_other_row_is_answered(server, tmp_path: Path) -> None:
    """Invalid UTF-8, deep nesting, a 5000-digit integer and a 9 MiB line never stop the batch."""
    kinds = ["invalid utf-8", "ok", "nested 5000 deep", "5000-digit integer", "ok"]
    expected = write_input(tmp_path / "in.jsonl", kinds)
    with open(tmp_path / "in.jsonl", "ab") as handle:
        handle.write(b'{"model": "a", "prompt": "' + b"x" * (9 * 2**20) + b'"}\n' + KINDS["ok"](9).encode() + b"\n")
    expected |= {len(expected) + 1, len(expected) + 2}
    job = BatchJob(input=tmp_path / "in.jsonl", output=tmp_path / "out.jsonl", server=server.url, progress=False)
    summary = run_batch(job)
    assert (summary.ok, summary.failed) == (4, 4)
    errors = {row["line"]: row["error"] for row in map(json.loads, job.errors_path.read_text().splitlines())}
    assert "not UTF-8" in errors[2] and "nested deeper than" in errors[4] and "too large" in errors[5], errors
    assert "longer than 8 MiB" in errors[7], errors
    assert_each_line_once(job, expected)


FOREIGN = {
    "the input itself": lambda folder: folder / "in.jsonl",
    "a file whose first row has no line": lambda folder: _foreign(folder, '{"note": "mine"}\n'),
    "another tool's JSONL": lambda folder: _foreign(folder, '{"line": 1, "text": "not a batch row"}\n'),
    "plain text": lambda folder: _foreign(folder, "keep me\nplease\n"),
}


def _foreign(folder: Path, text: str) -> Path:
    (folder / "precious.jsonl").write_text(text)
    return folder / "precious.jsonl"


@pytest.mark.parametrize("case", list(FOREIGN))
def test_batch_never_truncates_a_file_it_did_not_write(server, tmp_path: Path, case: str) -> None:
    write_input(tmp_path / "in.jsonl", ["ok", "ok"])
    out = FOREIGN[case](tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    result = run_cli("batch", str(tmp_path / "in.jsonl"), "--out", str(out), "--server", server.url, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(out) in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_batch_never_rewrites_an_errors_file_it_did_not_write(server, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", ["bad json"])
    (tmp_path / "out.errors.jsonl").write_text("my notes\n")
    job = BatchJob(input=tmp_path / "in.jsonl", output=tmp_path / "out.jsonl", server=server.url, progress=False)
    with pytest.raises(batch_rows.ForeignOutput, match="not an error row"):
        run_batch(job)
    assert (tmp_path / "out.errors.jsonl").read_text() == "my notes\n"


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=10),
    kill_points=st.lists(st.integers(min_value=0, max_value=12), max_size=3),
)
def test_any_kills_and_resumes_leave_every_line_in_exactly_one_output(server, tmp_path_factory, kinds, kill_points):
    folder = tmp_path_factory.mktemp("kills")
    expected = write_input(folder / "in.jsonl", kinds)
    job = BatchJob(
        input=folder / "in.jsonl", output=folder / "out.jsonl", server=server.url, concurrency=2, progress=False
    )
    real_append = batch_rows.JsonlAppender.append
    for kill_after in kill_points:
        writes = {"n": 0}

        def append_then_die(self, record, writes=writes, kill_after=kill_after):
            if writes["n"] == kill_after:
                text = json.dumps(record) + "\n"
                self.handle.write(text[: len(text) // 2])  # torn mid-line
                self.handle.flush()
                raise Killed
            writes["n"] += 1
            real_append(self, record)

        batch_rows.JsonlAppender.append = append_then_die
        try:
            run_batch(job)
        except Killed:
            pass
        finally:
            batch_rows.JsonlAppender.append = real_append
    run_batch(job)
    assert_each_line_once(job, expected)


@pytest.mark.slow
def test_sigkilled_batch_runs_resume_to_every_line_once(server, tmp_path: Path) -> None:
    kinds = ["ok", "no id", "duplicate id", "unknown model", "bad json", "blank"] * 6
    expected = write_input(tmp_path / "in.jsonl", kinds)
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "lorafleet", "batch", str(tmp_path / "in.jsonl"), "--out", str(out)]
    command += ["--server", server.url, "--model", BASE_ID, "--concurrency", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for answered_before_kill in (3, 8):  # killed mid-run, twice, once some rows are answered
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(lines_in_prefix(out)) < answered_before_kill and process.poll() is None:
            assert time.monotonic() < deadline, "the batch never got going"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, "it finished before it could be killed"
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 1, finished.stderr  # some rows are refused by design
    job = BatchJob(input=tmp_path / "in.jsonl", output=out, server=server.url)
    assert_each_line_once(job, expected)
