"""The `lorafleet` command: one module per subcommand group, assembled here.

    lorafleet validate configs/tiny.yaml
    lorafleet train configs/demo.yaml
    lorafleet data check data.jsonl --format alpaca
    lorafleet models pull builtin:smollm2-135m-instruct
"""

from __future__ import annotations

import sys

import typer

from lorafleet.cli import data, models, train, validate
from lorafleet.errors import LorafleetError

app = typer.Typer(
    name="lorafleet",
    help="Fine-tune LLMs with LoRA/QLoRA on Ray and serve the adapters (vLLM multi-LoRA or the CPU engine).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("validate")(validate.validate)
app.command("train")(train.train)
app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")


def main() -> None:
    """Console entry point: user mistakes print a clear message and an exit code, not a traceback."""
    try:
        app(standalone_mode=False)
    except LorafleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
