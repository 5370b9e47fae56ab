"""Shared fixtures: one model/data cache for the whole session (helpers for test files: tests/helpers.py)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import REPO

# One cache for the session (CI: the Makefile's, so the GGUF conversion happens once per clone).
os.environ.setdefault("LORAFLEET_HOME", str(REPO / ".cache" / "lorafleet"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `precision: auto` resolves the same on every machine in tests (fp32, as explicit configs did before auto); the
# tests of auto force the check both ways (tests/test_precision.py), and the demo test runs it unforced.
os.environ.setdefault("LORAFLEET_CPU_BF16", "0")


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from lorafleet.models import resolve_model

    return resolve_model("builtin:tiny-llama")
