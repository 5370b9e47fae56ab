"""Hostile or careless serving settings get a clear refusal (exit 2 naming the setting), never a weaker server."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_empty_api_key_is_refused_not_treated_as_no_auth(how: str) -> None:
    args = ["serve", "--engine", "cpu", "--base", "builtin:tiny-llama", "--port", "0"]
    if how == "flag":
        result = run_cli(*args, "--api-key", "", timeout=120)
    else:
        result = run_cli(*args, timeout=120, env={"LORAFLEET_API_KEY": "  "})
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert "api_key" in result.stderr and "empty API key would turn authentication off" in result.stderr
    assert "Traceback" not in result.stderr
