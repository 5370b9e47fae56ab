"""`lorafleet train` on a real embedded Ray cluster: tiny model, 2 CPU workers (DDP over gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import CONFIGS, run_cli


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("storage")
    result = run_cli(
        "train",
        str(CONFIGS / "tiny.yaml"),
        "--set",
        f"storage.uri={storage}",
        "--set",
        "training.max_steps=10",
        "--run-id",
        "tiny-two-workers",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "run tiny-two-workers" in result.stdout
    (storage / "runs" / "tiny-two-workers" / "console.txt").write_text(result.stdout + "\n--stderr--\n" + result.stderr)
    return storage / "runs" / "tiny-two-workers"


CHATTER = ("Token authentication", "PreemptionWatcher", "RayTrainWorker", "TrainController", "Warning", "it/s]")


@pytest.mark.slow
def test_the_console_shows_lorafleets_lines_and_the_run_log_keeps_the_rest(tiny_run: Path) -> None:
    stdout, stderr = (tiny_run / "console.txt").read_text().split("\n--stderr--\n")
    assert [c for c in CHATTER if c in stdout + stderr] == [], stdout + stderr
    lines = stdout.splitlines()
    assert lines[0] == "run tiny-two-workers" and lines[2] == f"log {tiny_run / 'logs' / 'train.log'}", lines
    assert sum("[tiny-two-workers] step " in line for line in lines) >= 10 and "succeeded: 10 steps" in stdout
    log = (tiny_run / "logs" / "train.log").read_text()
    assert "(RayTrainWorker pid=" in log and "[tiny-two-workers] step 10/10" in log


@pytest.mark.slow
def test_two_worker_run_writes_a_complete_run_folder(tiny_run: Path) -> None:
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "run.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
    ):
        assert (tiny_run / name).is_file(), name
    assert not list((tiny_run / "adapter").glob("optimizer*"))
    summary = json.loads((tiny_run / "run.json").read_text())
    assert summary["status"] == "succeeded" and summary["global_step"] == 10
    assert [path for path in (tiny_run / "checkpoints").glob("checkpoint_*") if path.is_dir()]
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_two_worker_run_lowers_the_loss(tiny_run: Path) -> None:
    losses = [record["loss"] for record in read_metrics(tiny_run) if "loss" in record]
    assert len(losses) >= 5
    assert losses[-1] < losses[0], losses
    assert all("tokens_per_second" in r for r in read_metrics(tiny_run) if "loss" in r)


@pytest.mark.slow
def test_adapter_loads_with_plain_peft(tiny_run: Path, tiny_model_dir: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():
        base_logits = base(inputs).logits
    model = PeftModel.from_pretrained(base, str(tiny_run / "adapter"))
    with torch.no_grad():
        tuned_logits = model(inputs).logits
    assert not torch.allclose(base_logits, tuned_logits), "the adapter changed nothing"
    adapter_config = json.loads((tiny_run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "builtin:tiny-llama"
    assert adapter_config["r"] == 8
