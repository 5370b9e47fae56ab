"""`lorafleet models pull|list`: provision builtin base models into the cache."""

from __future__ import annotations

import typer

from lorafleet import models
from lorafleet.paths import models_dir

app = typer.Typer(help="Base models: provision builtin ones into the cache.", no_args_is_help=True)


@app.command("pull")
def pull(reference: str = typer.Argument(..., help="builtin:<name>, e.g. builtin:smollm2-135m-instruct")) -> None:
    """Provision a builtin model once (later runs reuse it) and print its folder."""
    if not models.is_builtin(reference):
        raise models.ModelNotFound(f"only builtin models are pulled; known: {', '.join(models.builtin_names())}")
    path = models.resolve_model(reference)
    typer.echo(path)


@app.command("list")
def list_models() -> None:
    """Builtin models and whether each is provisioned."""
    for name in models.builtin_names():
        folder = models_dir() / name
        state = str(folder) if (folder / "config.json").is_file() else "not provisioned"
        typer.echo(f"builtin:{name}\t{state}")
