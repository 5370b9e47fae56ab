"""Shared fixtures: one model/data cache for the whole session, and the real CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# One cache for the session (CI: the Makefile's, so the GGUF conversion happens once per clone).
os.environ.setdefault("LORAFLEET_HOME", str(REPO / ".cache" / "lorafleet"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(*args: str, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `lorafleet ARGS...` exactly as a user would (exit codes and stderr included)."""
    return subprocess.run(
        [sys.executable, "-c", "from lorafleet.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from lorafleet.models import resolve_model

    return resolve_model("builtin:tiny-llama")
