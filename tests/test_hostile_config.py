"""Hostile or broken config files: a clear error naming file:line (exit 2), never a traceback, and bounded cost."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from lorafleet.config import load_job_config
from lorafleet.errors import ConfigError
from tests.helpers import CONFIGS, run_cli

TINY = (CONFIGS / "tiny.yaml").read_bytes()
BOMB = b"".join(
    [b'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n']
    + [f"{x}: &{x} [{','.join(['*' + p] * 9)}]\n".encode() for p, x in zip("abcdef", "bcdefg", strict=True)]
)

# file bytes, the text expected in the error (after "job.yaml")
CASES = {
    "latin-1 byte": (TINY.replace(b"name: tiny", b"name: tiny # caf\xe9"), ":3: not UTF-8 text (byte 0xe9)"),
    "duplicate key": (TINY + b"name: other\n", "duplicate key 'name' (first at line"),
    "duplicate nested key": (
        TINY.replace(b"training:\n", b"training:\n  max_steps: 1\n  max_steps: 2\n", 1),
        "duplicate key 'max_steps' (first at line",
    ),
    "recursive alias": (b"name: &n [*n]\n", ":1: a recursive alias"),
    "alias bomb": (BOMB, "aliases expand this document past 100,000 nodes"),
    "not yaml": (b"name: [unclosed\n", "invalid YAML"),
    "top level list": (b"- a\n- b\n", "the top level must be a mapping"),
    "learning rate .inf": (TINY.replace(b"learning_rate: 0.003", b"learning_rate: .inf"), "training.learning_rate"),
    "learning rate .nan": (TINY.replace(b"learning_rate: 0.003", b"learning_rate: .nan"), "training.learning_rate"),
    "max_steps past a billion": (
        TINY.replace(b"max_steps: 10", b"max_steps: 99999999999999999999999"),
        "training.max_steps",
    ),
    "100000 workers": (TINY.replace(b"num_workers: 2", b"num_workers: 100000"), "distributed.num_workers"),
    "CPU .nan per worker": (
        TINY.replace(b"resources_per_worker: {CPU: 1}", b"resources_per_worker: {CPU: .nan}"),
        "distributed.resources_per_worker",
    ),
    "an empty train path": (TINY.replace(b"train: builtin:price", b'train: ""'), "data.train: must not be empty"),
    "a missing model folder": (
        TINY.replace(b"name_or_path: builtin:tiny-llama", b"name_or_path: /no/such/model"),
        "model folder not found: /no/such/model",
    ),
    "a folder that is not a model": (
        TINY.replace(b"name_or_path: builtin:tiny-llama", b"name_or_path: /tmp"),
        "/tmp is not a model folder: it has no config.json",
    ),
    "an empty storage uri": (TINY + b'storage:\n  uri: ""\n', "storage.uri: must not be empty"),
    "a data path that is a directory": (TINY.replace(b"train: builtin:price", b"train: /tmp/"), "is a directory"),
    "CPU 1e300 per worker": (
        TINY.replace(b"resources_per_worker: {CPU: 1}", b"resources_per_worker: {CPU: 1e300}"),
        "resources_per_worker.CPU must be from 0 to",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_config_file_is_refused_with_its_location(tmp_path: Path, case: str) -> None:
    content, expected = CASES[case]
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_job_config(path)
    assert time.monotonic() - started < 5 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000
    assert expected in str(caught.value) and str(path) in str(caught.value), str(caught.value)


def test_the_cli_prints_the_same_error_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(BOMB)
    result = run_cli("validate", str(path), timeout=60)
    assert result.returncode == 2 and "aliases expand this document" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_4bit_with_fsdp_is_refused_naming_both_knobs(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(
        TINY.replace(b"model:\n", b"model:\n  quantization: 4bit\n", 1)
        .replace(b"strategy: ddp", b"strategy: fsdp")
        .replace(b"distributed:\n", b"distributed:\n  use_gpu: true\n")
        .replace(b"precision: fp32", b"precision: bf16")
    )
    with pytest.raises(ConfigError) as caught:
        load_job_config(path)
    assert "model.quantization: 4bit and strategy: fsdp cannot be used together" in str(caught.value)


def test_more_workers_than_the_embedded_ray_can_run_is_refused_before_ray_starts(tmp_path: Path) -> None:
    """200 workers pass validation (a cluster may have them); the embedded Ray of a laptop refuses at once."""
    path = tmp_path / "job.yaml"
    path.write_bytes(TINY.replace(b"num_workers: 2", b"num_workers: 200"))
    started = time.monotonic()
    result = run_cli("train", str(path), "--set", f"storage.uri={tmp_path / 'storage'}", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "distributed.num_workers" in result.stderr and "--address" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60
    assert not (tmp_path / "storage").exists(), "nothing is written for a run that never started"
