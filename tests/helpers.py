"""Helpers shared by test files: the real CLI as a subprocess, and a tiny server with two adapters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BASE_ID = "tiny"  # the served name of the tiny base in serving tests


def run_cli(*args: str, timeout: float = 900, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Run `lorafleet ARGS...` exactly as a user would (exit codes and stderr included); env None values unset."""
    return subprocess.run(
        [sys.executable, "-c", "from lorafleet.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={name: value for name, value in {**os.environ, **(env or {})}.items() if value is not None},
        cwd=REPO,
    )


def two_adapters(model_dir: str, root: Path) -> Path:
    """Random adapters `a` (LoRA on attention) and `b` (LoRA on every linear layer) of `model_dir` under `root`."""
    from lorafleet.serving.testing import make_adapter

    make_adapter(model_dir, root / "a", "lora", seed=1)
    make_adapter(model_dir, root / "b", "lora-all", seed=2)
    return root


def tiny_serving_config(model_dir: str, adapter_root: Path, **changes: Any):
    """The tiny base served as `tiny` with adapters a and b; `changes` override any setting."""
    from lorafleet.serving.config import ServingConfig

    values: dict[str, Any] = {
        "base": model_dir,
        "served_model_name": BASE_ID,
        "adapters": {"a": str(adapter_root / "a"), "b": str(adapter_root / "b")},
        "max_model_len": 256,
        "max_tokens": 64,
        "torch_threads": 1,  # the model thread only; steadier on a busy CI machine
    }
    return ServingConfig(**{**values, **changes})
