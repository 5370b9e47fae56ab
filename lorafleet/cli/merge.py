"""`lorafleet merge RUN`: the run's adapter merged into its base, saved as a plain HF model folder.

    lorafleet merge price-20250101-120000                   # -> <run>/merged/ (bf16); then: publish --merged
    lorafleet merge runs/price-20250101-120000 --out /models/price --dtype fp32 --max-shard-size 2GB

Exit codes: 0 merged, 2 cannot merge as asked (prefix/prompt methods, existing --out), 1 other failures.
"""

from __future__ import annotations

from pathlib import Path

import typer

RunArg = typer.Argument(..., help="A run folder, or a run id under <storage>/runs/.")
StorageOption = typer.Option(
    None,
    "--storage",
    help="Storage root holding runs/ (path, file:// or s3://). Default: $LORAFLEET_STORAGE, else the cache.",
)


def merge(
    run: str = RunArg,
    out: Path = typer.Option(None, "--out", file_okay=False, help="Model folder to write. Default: <run>/merged."),
    dtype: str = typer.Option("bf16", "--dtype", help="Weights dtype of the merged model: bf16, fp32 or fp16."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard (e.g. 2GB)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists (swapped in atomically)."),
    storage: str = StorageOption,
) -> None:
    """Merge a LoRA/DoRA/IA3 adapter into its base (QLoRA: into the dequantized base) and save it."""
    from lorafleet.runs import MERGED_DIR, open_run, push_run_part
    from lorafleet.training.merge import merge_run

    finished = open_run(run, storage)
    summary = merge_run(finished, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    if out is None:
        push_run_part(finished.path, MERGED_DIR)
    typer.echo(
        f"merged {summary.method} adapter into {summary.out_dir} ({summary.dtype}, {summary.shards} shard(s), "
        f"{summary.size_bytes / 1e6:.1f} MB) in {summary.seconds}s\n"
        f"check: max |logit diff| vs base + adapter {summary.max_abs_logit_diff:.3g} "
        f"(adapter effect {summary.adapter_effect:.3g})"
    )
