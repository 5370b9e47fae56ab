"""`lorafleet data check|make-demo`: inspect a dataset, or generate the demo datasets."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Datasets: check a file, generate the demo sets.", no_args_is_help=True)


@app.command("check")
def check(
    file: Path = typer.Argument(..., help="A .json/.jsonl/.csv/.parquet file."),
    format: str = typer.Option(..., "--format", "-f", help="alpaca | chat | completion | text"),
    model: str = typer.Option("builtin:tiny-llama", "--model", help="Tokenizer used for token lengths."),
    max_seq_len: int = typer.Option(512, "--max-seq-len", help="Examples longer than this count as truncated."),
) -> None:
    """Validate every row (errors name file:line and field) and print a summary."""
    from lorafleet.training.data import check_file

    summary = check_file(file, format, model_reference=model, max_seq_len=max_seq_len)
    typer.echo(summary.render())


@app.command("make-demo")
def make_demo(
    out: Path = typer.Option(None, "--out", help="Folder to write into (default: the lorafleet data cache)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same rows."),
) -> None:
    """Generate the demo datasets (product pricing, support tickets) as train/test JSONL."""
    from lorafleet.demo_data import make_demo_datasets

    for task, files in make_demo_datasets(out, seed=seed).items():
        for split, path in files.items():
            typer.echo(f"{task}/{split}\t{path}")
