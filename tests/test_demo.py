"""`lorafleet demo` end to end, on the tiny model so it fits in CI: the same command `make demo` runs.

Two jobs named like the demo's (price, support) train on 2 Ray workers, are evaluated, published, served together
by the CPU engine, and asked a question each through the official openai client.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import CONFIGS, run_cli

pytestmark = pytest.mark.slow


def tiny_demo_configs(folder: Path) -> Path:
    tiny = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    for name, config_file, dataset, data_format in (
        ("price", "demo.yaml", "builtin:price-completion", "completion"),  # as configs/demo.yaml
        ("support", "demo-support.yaml", "builtin:support", "alpaca"),
    ):
        data = {**tiny["data"], "train": dataset, "format": data_format, "max_rows": 200}
        job = {**tiny, "name": name, "data": data}
        job["training"] = {**tiny["training"], "max_steps": 6}
        (folder / config_file).write_text(yaml.safe_dump(job))
    return folder


UNFORCED = {"LORAFLEET_CPU_BF16": None}  # `precision: auto` decided by this machine, as a user's demo is


def test_demo_trains_evaluates_publishes_serves_and_answers(tmp_path: Path) -> None:
    configs = tiny_demo_configs(tmp_path)
    storage = tmp_path / "storage"
    command = ("demo", "--configs", str(configs), "--storage", str(storage), "--eval-examples", "4")
    result = run_cli(*command, timeout=1500, env=UNFORCED)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert result.stdout.count("] precision auto -> ") == 2, result.stdout[-3000:]  # one line per training run

    for name in ("price", "support"):
        run_dir = storage / "runs" / f"demo-{name}"
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        report = json.loads((run_dir / "report" / "eval.json").read_text())
        assert report, f"empty eval report for {name}"
        assert (run_dir / "report" / "eval.md").is_file()
        manifest = json.loads((storage / "adapters" / name / "v1" / "manifest.json").read_text())
        assert len(manifest["data_hash"]) == 64 and manifest["run_id"] == f"demo-{name}"
        assert f"[{name}]" in result.stdout, result.stdout[-3000:]
    assert "[price] (completions)" in result.stdout and "[support] (chat completions)" in result.stdout
    assert "served models:" in result.stdout and "price" in result.stdout and "support" in result.stdout
    assert result.stdout.count("→ fine-tuned: ") == 2 and result.stdout.count("→ base model: ") == 2, result.stdout
    assert f"{storage}/runs/demo-price/report/eval.md" in result.stdout
    assert "→ fine-tuned, 16 samples (" in result.stdout and "geometric mean $" in result.stdout, result.stdout
    # a quiet console: no library notices, no per-request access log
    console = result.stdout + result.stderr
    for noise in ("Failed to load CPU gemm_4bit_forward", "FutureWarning", '"POST /v1/'):
        assert noise not in console, noise

    # A second demo reuses the trained runs instead of training again.
    again = run_cli(*command, timeout=900, env=UNFORCED)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already trained" in again.stdout
