"""`lorafleet validate CONFIG`: report every problem in a job config at once (exit 2), or summarise it."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.adapter_config import describe_adapter
from lorafleet.cli import options


def validate(config: Path = options.ConfigArg, overrides: list[str] = options.SetOption) -> None:
    """Check a job config; problems name the field path and file:line."""
    job = options.load(config, overrides)
    typer.echo(
        f"{config}: ok — job {job.name!r}, model {job.model.name_or_path}, {describe_adapter(job.adapter)}, "
        f"{job.distributed.num_workers} worker(s), storage {job.storage.uri}"
    )
    if job.sweep is not None:
        sweep = job.sweep
        scheduler = "ASHA" if sweep.scheduler else "no scheduler"
        typer.echo(
            f"sweep over {', '.join(sweep.space)}: {sweep.num_samples} sample(s), {sweep.metric} ({sweep.mode}), "
            f"{scheduler}, {sweep.max_concurrent_trials or 'as many as fit'} at once"
        )
