"""`lorafleet export RUN|MODEL --format gguf --out FILE`: a merged GGUF file for llama.cpp and Ollama.

    lorafleet export price-20250101-120000 --format gguf --outtype q8_0 --out /models/price.gguf
    lorafleet export registry:price-merged@v2 --format gguf --out price.gguf

Writes FILE and an Ollama Modelfile beside it (price.Modelfile). Exit codes: 0 written, 2 cannot export as asked
(an unmergeable run, an architecture or tokenizer GGUF cannot hold, an existing FILE), 1 other failures.
"""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    model: str = typer.Argument(..., help="A run (merged first), registry:NAME[@VER], a model folder or builtin:."),
    fmt: str = typer.Option("gguf", "--format", help="Output format: gguf."),
    outtype: str = typer.Option("f16", "--outtype", help="Weights in the file: f16 or q8_0."),
    out: Path = typer.Option(..., "--out", dir_okay=False, help="File to write (e.g. price.gguf)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace FILE and its Modelfile if they exist."),
    storage: str = typer.Option(None, "--storage", help="Storage root holding runs/ and the registry."),
) -> None:
    """Export a merged model as one GGUF file plus an Ollama Modelfile."""
    from lorafleet.training.export import export_model

    summary = export_model(model, out, fmt=fmt, outtype=outtype, overwrite=overwrite, storage=storage)
    typer.echo(
        f"exported {model} to {summary.gguf} ({outtype}, {summary.size_bytes / 1e6:.1f} MB); "
        f"Modelfile {summary.modelfile} (template: {summary.template})"
    )
