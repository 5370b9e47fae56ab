"""`lorafleet batch` on the tiny model with two adapters: in-process, against a real server, resumed, with bad rows,
and on a local Ray cluster (slow). Answers are compared with the server's for the same requests (greedy).
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from lorafleet.serving.app import create_app
from lorafleet.serving.batch_inference import run_batch
from lorafleet.serving.batch_rows import BatchJob
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.server import ServerThread
from tests.helpers import BASE_ID, run_cli, tiny_serving_config, two_adapters

GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
ROWS = [
    {"custom_id": "c1", "model": "a", "prompt": "Hello there", **GREEDY},
    {"custom_id": "c2", "model": "b", "messages": [{"role": "user", "content": "hi"}], **GREEDY},
    {"id": "c3", "prompt": "Once upon a time", **GREEDY},  # the model comes from --model
    {"custom_id": "c4", "method": "POST", "url": "/v1/completions", "body": {"model": "b", "prompt": "x", **GREEDY}},
    {"custom_id": "c5", "model": "tiny", "messages": [{"role": "user", "content": "2+2?"}], **GREEDY},
]


@pytest.fixture(scope="module")
def settings(tiny_model_dir, tmp_path_factory) -> ServingConfig:
    root = two_adapters(tiny_model_dir, tmp_path_factory.mktemp("batch-adapters"))
    return tiny_serving_config(tiny_model_dir, root, max_model_len=128, max_tokens=16, drain_timeout_s=5)


@pytest.fixture(scope="module")
def server(settings):
    with ServerThread(create_app(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def expected(server) -> dict[str, str]:
    """What the server answers to each row's request, one request at a time."""
    answers = {}
    for row in ROWS:
        body = row.get("body") or {k: v for k, v in row.items() if k not in ("custom_id", "id")}
        body = {"model": BASE_ID, **body}
        route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        answer = httpx.post(f"{server.url}{route}", json=body, timeout=60).json()
        choice = answer["choices"][0]
        answers[row.get("custom_id") or row["id"]] = (
            choice["message"]["content"] if "messages" in body else choice["text"]
        )
    return answers


def write_rows(path, rows) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def read_output(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def texts(records) -> dict[str, str]:
    out = {}
    for record in records:
        choice = record["response"]["choices"][0]
        out[record["custom_id"]] = choice["message"]["content"] if "message" in choice else choice["text"]
    return out


def served_requests(server) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    pattern = r'^lorafleet_requests_total\{[^}]*route="/v1/(chat/)?completions"[^}]*\} ([0-9.e+]+)$'
    return sum(float(match.group(2)) for match in re.finditer(pattern, metrics, re.MULTILINE))


def test_in_process_answers_equal_the_servers(settings, expected, tmp_path):
    write_rows(tmp_path / "in.jsonl", ROWS)
    job = BatchJob(
        input=tmp_path / "in.jsonl", output=tmp_path / "out.jsonl", model=BASE_ID, settings=settings, progress=False
    )
    summary = run_batch(job)
    assert (summary.ok, summary.failed, summary.skipped) == (5, 0, 0)
    records = read_output(tmp_path / "out.jsonl")
    assert sorted(r["line"] for r in records) == [1, 2, 3, 4, 5]
    assert {r["custom_id"]: r["model"] for r in records} == {
        "c1": "a",
        "c2": "b",
        "c3": BASE_ID,
        "c4": "b",
        "c5": "tiny",
    }
    assert texts(records) == expected
    assert len(set(expected.values())) == 5  # the adapters answer differently: the comparison means something
    assert records[0]["response"]["usage"]["completion_tokens"] == 6
    assert not job.errors_path.exists()


def test_server_mode_and_resume_after_a_crash(server, expected, tmp_path):
    write_rows(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    job = BatchJob(
        input=tmp_path / "in.jsonl", output=out, model=BASE_ID, server=server.url, concurrency=3, progress=False
    )
    before = served_requests(server)
    assert run_batch(job).ok == 5 and served_requests(server) - before == 5
    records = read_output(out)
    assert texts(records) == expected

    # a crash after two rows, in the middle of writing the third
    kept = out.read_text().splitlines(keepends=True)[:2]
    out.write_text("".join(kept) + kept[0][: len(kept[0]) // 2])
    before = served_requests(server)
    summary = run_batch(job)
    assert (summary.ok, summary.skipped) == (3, 2) and served_requests(server) - before == 3
    resumed = read_output(out)  # every line parses: the torn one was cut off
    assert len(resumed) == 5 and sorted(r["line"] for r in resumed) == [1, 2, 3, 4, 5]
    assert resumed[:2] == [json.loads(line) for line in kept]  # done rows are not redone
    assert texts(resumed) == expected

    before = served_requests(server)
    assert run_batch(job).skipped == 5 and served_requests(server) == before


def test_bad_rows_go_to_the_errors_file_with_line_numbers(settings, tmp_path):
    rows = [
        ROWS[0],
        '{"prompt": "unterminated',
        {"model": "a", "prompt": "x", "temprature": 0},
        {"model": "nope", "prompt": "x", **GREEDY},
        {"prompt": "no model anywhere"},
        "",
        {"custom_id": "c1", "model": "a", "prompt": "same id again"},
        {"model": "a", "prompt": "fine", **GREEDY},
    ]
    write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    adapters = [f"--adapter={name}={path}" for name, path in settings.adapters.items()]
    result = run_cli(
        "batch", str(tmp_path / "in.jsonl"), "--out", str(out), "--base", settings.base, *adapters, "--no-progress"
    )
    errors_path = tmp_path / "out.errors.jsonl"
    assert result.returncode == 1, result.stderr
    assert f"2 ok, 5 failed (see {errors_path})" in result.stderr
    errors = {e["line"]: e for e in read_output(errors_path)}
    assert sorted(errors) == [2, 3, 4, 5, 7]
    assert "invalid JSON" in errors[2]["error"]
    assert errors[3]["error"] == "temprature: unknown field" and errors[3]["status"] == 400
    assert errors[4]["status"] == 404 and "nope" in errors[4]["error"]
    assert "no model" in errors[5]["error"]
    assert errors[7]["custom_id"] == "c1" and "also on line 1" in errors[7]["error"]
    assert sorted(r["line"] for r in read_output(out)) == [1, 8]


def test_flags_that_contradict_each_other_exit_2(settings, tmp_path):
    write_rows(tmp_path / "in.jsonl", ROWS[:1])
    (tmp_path / "serve.yaml").write_text(f"engine: vllm\nbase: {settings.base}\n")
    argv = ["batch", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl")]
    on_vllm = run_cli(*argv, "--config", str(tmp_path / "serve.yaml"))
    assert on_vllm.returncode == 2 and "engine: batch runs the CPU engine in-process" in on_vllm.stderr
    both = run_cli(*argv, "--server", "http://127.0.0.1:1", "--base", settings.base, "--ray", "auto")
    assert both.returncode == 2 and "--base: picks the in-process engine" in both.stderr and "--ray:" in both.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_ray_data_run_writes_the_same_answers(settings, expected, tmp_path):
    import ray

    write_rows(tmp_path / "in.jsonl", ROWS)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        job = BatchJob(
            input=tmp_path / "in.jsonl",
            output=tmp_path / "out.jsonl",
            model=BASE_ID,
            settings=settings,
            ray="local",
            progress=False,
        )
        summary = run_batch(job)
    finally:
        ray.shutdown()
    assert (summary.ok, summary.failed) == (5, 0)
    records = read_output(tmp_path / "out.jsonl")
    assert sorted(r["line"] for r in records) == [1, 2, 3, 4, 5]
    assert texts(records) == expected


def test_a_row_may_ask_n_choices_and_gets_the_servers_n_answers(settings, server, tmp_path):
    sampled = {"max_tokens": 5, "temperature": 1.0, "seed": 21, "ignore_eos": True, "n": 3}
    rows = [{"custom_id": "many", "model": "a", "prompt": "Pick a number", **sampled}]
    write_rows(tmp_path / "in.jsonl", rows)
    job = BatchJob(
        input=tmp_path / "in.jsonl", output=tmp_path / "out.jsonl", model=BASE_ID, settings=settings, progress=False
    )
    assert run_batch(job).ok == 1
    (record,) = read_output(tmp_path / "out.jsonl")
    body = {"model": "a", "prompt": "Pick a number", **sampled}
    served = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"]
    choices = record["response"]["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["text"] for c in choices] == [c["text"] for c in served]
