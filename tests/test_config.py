"""`lorafleet validate`: every shipped config is valid; broken ones exit 2 naming the field and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.config import JobConfig, load_job_config
from lorafleet.errors import ConfigError
from tests.helpers import CONFIGS, run_cli

VALID = """\
name: job
model:
  name_or_path: builtin:tiny-llama
adapter:
  r: 8
data:
  train: train.jsonl
  format: alpaca
training:
  max_steps: 5
  learning_rate: 0.001
distributed:
  num_workers: 2
"""


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def write_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_valid_config_resolves_relative_paths_and_defaults(tmp_path: Path) -> None:
    job = load_job_config(write_config(tmp_path, VALID))
    assert isinstance(job, JobConfig)
    assert job.data.train == str((tmp_path / "train.jsonl").resolve())
    assert job.adapter.method == "lora" and job.model.trust_remote_code is False


# (name, edit of VALID, text expected in the error output)
BROKEN = [
    ("unknown key", VALID.replace("  r: 8", "  r: 8\n  rnak: 4"), "job.yaml:6 adapter.rnak: unknown key"),
    ("wrong type", VALID.replace("max_steps: 5", "max_steps: many"), "job.yaml:10 training.max_steps"),
    ("negative lr", VALID.replace("learning_rate: 0.001", "learning_rate: -1"), "training.learning_rate"),
    ("r=0", VALID.replace("r: 8", "r: 0"), "job.yaml:5 adapter.r: Input should be greater than 0"),
    ("missing data file", VALID.replace("train.jsonl", "nope.jsonl"), "data file not found"),
    ("bad yaml", VALID.replace("  r: 8", "  r: [8"), "job.yaml:6"),
    ("missing section", VALID.replace("model:\n  name_or_path: builtin:tiny-llama\n", ""), "model: required key"),
    ("bad enum", VALID.replace("format: alpaca", "format: alpacca"), "job.yaml:8 data.format"),
    ("zero workers", VALID.replace("num_workers: 2", "num_workers: 0"), "distributed.num_workers"),
    ("bad job name", VALID.replace("name: job", "name: ../evil"), "job.yaml:1 name"),
    ("fp16 on cpu", VALID.replace("  max_steps: 5", "  max_steps: 5\n  precision: fp16"), "fp16 needs"),
    ("gpu resource without use_gpu", VALID + "  resources_per_worker: {GPU: 1}\n", "use_gpu: true"),
    ("empty target modules", VALID.replace("  r: 8", "  r: 8\n  target_modules: []"), "adapter.target_modules"),
    ("top level list", "- a\n- b\n", "top level must be a mapping"),
]


@pytest.mark.parametrize(("name", "text", "expected"), BROKEN, ids=[case[0] for case in BROKEN])
def test_broken_config_exits_2_naming_the_problem(tmp_path: Path, name: str, text: str, expected: str) -> None:
    result = run_cli("validate", str(write_config(tmp_path, text)))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = VALID.replace("r: 8", "r: 0").replace("learning_rate: 0.001", "learning_rate: -1")
    text = text.replace("num_workers: 2", "num_workers: 0\n  typo: 1")
    with pytest.raises(ConfigError) as info:
        load_job_config(write_config(tmp_path, text))
    locations = " ".join(problem.location for problem in info.value.problems)
    for field in ("adapter.r", "training.learning_rate", "distributed.num_workers", "distributed.typo"):
        assert field in locations


def test_set_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    path = write_config(tmp_path, VALID)
    job = load_job_config(path, ["training.max_steps=20", "adapter.target_modules=[q_proj, v_proj]"])
    assert job.training.max_steps == 20 and job.adapter.target_modules == ["q_proj", "v_proj"]
    result = run_cli("validate", str(path), "--set", "adapter.r=-3", "--set", "nokey")
    assert result.returncode == 2
    assert "--set nokey: expected key.path=value" in result.stderr
    result = run_cli("validate", str(path), "--set", "adapter.r=-3")
    assert result.returncode == 2 and "adapter.r" in result.stderr


def test_config_reference_doc_is_current() -> None:
    from lorafleet.config_reference import render
    from tests.helpers import REPO

    assert (REPO / "docs" / "config.md").read_text() == render(), (
        "docs/config.md is stale: python -m lorafleet.config_reference > docs/config.md"
    )
