"""Options shared by every command that takes a job config."""

from __future__ import annotations

from pathlib import Path

import typer

ConfigArg = typer.Argument(..., exists=False, dir_okay=False, help="Job config YAML.")
SetOption = typer.Option(
    None, "--set", help="Override a config value: key.path=value (value read as YAML). Repeatable."
)


def load(config: Path, overrides: list[str] | None):
    from lorafleet.config import load_job_config

    return load_job_config(config, overrides or [])
