"""`lorafleet train CONFIG`: run a fine-tune on an embedded Ray (or `--address`)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli import options


def train(
    config: Path = options.ConfigArg,
    overrides: list[str] = options.SetOption,
) -> None:
    """Fine-tune with Ray Train; prints the run id and folder."""
    raise NotImplementedError
