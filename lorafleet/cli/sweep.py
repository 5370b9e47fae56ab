"""`lorafleet sweep CONFIG`: the config's `sweep:` section as Ray Tune trials, each a normal run.

lorafleet sweep configs/sweep-tiny.yaml --publish tiny-best
lorafleet sweep --resume tiny-sweep-20261202-101500      # after the driver died: finished trials stay
"""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli import options
from lorafleet.errors import LorafleetError


def sweep(
    config: Path = typer.Argument(None, dir_okay=False, help="Job config YAML with a sweep: section."),
    overrides: list[str] = options.SetOption,
    address: str = typer.Option(None, "--address", help="Ray cluster to join (e.g. auto); default: embedded Ray."),
    sweep_id: str = typer.Option(None, "--sweep-id", help="Name the sweep (default: <job name>-sweep-<UTC time>)."),
    resume: str = typer.Option(
        None, "--resume", help="Continue sweep SWEEP_ID: finished trials stay, unfinished ones resume."
    ),
    storage: str = typer.Option(
        None, "--storage", help="With --resume and no CONFIG: the storage root (default: the local cache)."
    ),
    publish: str = typer.Option(None, "--publish", help="Publish the best trial's adapter to the registry as NAME."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's and the libraries' output too."),
) -> None:
    """Tune hyperparameters with Ray Tune (ASHA stops bad trials early); prints the best trial."""
    from lorafleet.paths import default_storage_uri
    from lorafleet.sweeps import SweepFolder
    from lorafleet.training.sweep import run_sweep

    if resume:
        if overrides:
            raise LorafleetError("--resume continues the sweep with its saved config: drop --set")
        root = options.load(config, []).storage.uri if config else (storage or default_storage_uri())
        job = SweepFolder.of(root, resume).read_config()
    elif config is None:
        raise LorafleetError("give a job config with a sweep: section, or --resume SWEEP_ID")
    else:
        job = options.load(config, overrides)
    outcome = run_sweep(job, sweep_id=resume or sweep_id, address=address, verbose=verbose)
    counts = {status: sum(row.status == status for row in outcome.rows) for status in ("finished", "stopped early")}
    failed = len(outcome.rows) - sum(counts.values())
    typer.echo(
        f"sweep {outcome.folder.sweep_id}: {len(outcome.rows)} trials, {counts['finished']} finished, "
        f"{counts['stopped early']} stopped early, {failed} failed\nresults {outcome.folder}/results.md"
    )
    best = outcome.best
    if best is None:
        typer.echo("no trial left an adapter with a finite metric", err=True)
        raise typer.Exit(1)
    typer.echo(f"best {best.run_id}: {best.metric} {best.value:.4g} with {best.parameters}\nadapter {best.adapter_dir}")
    if publish:
        from lorafleet.registry import publish_run

        published = publish_run(job.storage.uri, best.run_dir, name=publish)
        typer.echo(f"published {published.kind}/{published.reference}\n{published.path}")
