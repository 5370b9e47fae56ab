"""`lorafleet train CONFIG`: run a fine-tune on an embedded Ray (or `--address`)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli import options


def train(
    config: Path = options.ConfigArg,
    overrides: list[str] = options.SetOption,
    address: str = typer.Option(None, "--address", help="Ray cluster to join (e.g. auto); default: embedded Ray."),
    run_id: str = typer.Option(None, "--run-id", help="Name the run (default: <job name>-<UTC time>)."),
    resume: str = typer.Option(
        None, "--resume", help="Continue run RUN_ID from its last complete checkpoint (with its saved config)."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show Ray's and the libraries' output too (always in the run's logs/train.log)."
    ),
) -> None:
    """Fine-tune with Ray Train; prints the run id, progress, and where the adapter is."""
    from lorafleet.training.launcher import load_run_config, run_training

    job = options.load(config, overrides)
    if resume:
        job = load_run_config(job.storage.uri, resume)
        run_id = resume
    if job.sweep is not None:
        typer.echo("note: train runs the config once with its own values; `lorafleet sweep` runs its sweep: section")
    summary = run_training(job, run_id=run_id, address=address, verbose=verbose)
    loss = f"{summary.train_loss:.4f}" if summary.train_loss is not None else "n/a"
    typer.echo(
        f"run {summary.run_id} {summary.status}: {summary.global_step} steps in {summary.seconds}s, "
        f"mean train loss {loss}\nadapter {summary.adapter_dir}"
    )
