"""`lorafleet quantize MODEL --method ...`: a quantized model folder for vLLM and the CPU engine.

    lorafleet quantize price-20250101-120000 --method gptq-w4a16 --out /models/price-w4a16
    lorafleet quantize registry:price-merged@v2 --method int8 --out /models/price-int8
    lorafleet quantize builtin:smollm2-135m-instruct --method gptq-w4a16 --calibration rows.jsonl --out base-w4a16

Exit codes: 0 written, 2 cannot quantize as asked (unknown method, no calibration data, unmergeable run), 1 other.
"""

from __future__ import annotations

from pathlib import Path

import typer


def quantize(
    model: str = typer.Argument(..., help="registry:NAME[@VER] (merged), a run, a model folder, builtin: or hub id."),
    method: str = typer.Option(..., "--method", help="int8, int4, gptq-w4a16 or w8a8."),
    out: Path = typer.Option(..., "--out", file_okay=False, help="Model folder to write."),
    calibration: str = typer.Option(
        None, "--calibration", help="FILE (JSONL rows) or RUN for GPTQ; default: MODEL's own run's training rows."
    ),
    calibration_format: str = typer.Option(
        None, "--calibration-format", help="alpaca, chat, completion or text (default: detected)."
    ),
    samples: int = typer.Option(128, "--calibration-samples", min=1, help="Calibration rows used."),
    dtype: str = typer.Option("bf16", "--dtype", help="dtype of what stays unquantized (bf16, fp16, fp32)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists (swapped in atomically)."),
    storage: str = typer.Option(None, "--storage", help="Storage root holding runs/ and the registry."),
) -> None:
    """Quantize a model's Linear layers (post-training) into the compressed-tensors format vLLM loads."""
    from lorafleet.training.quantize import QuantizeSettings, quantize_model

    settings = QuantizeSettings(
        method=method,
        out=out,
        calibration=calibration,
        calibration_format=calibration_format,
        calibration_samples=samples,
        dtype=dtype,
        storage=storage,
        overwrite=overwrite,
    )
    summary = quantize_model(model, settings)
    record = summary.record
    line = f"quantized {model} ({record['method']}, {record['layers']} layers) into {summary.out_dir}: "
    line += f"{summary.size_bytes / 1e6:.1f} MB in {summary.seconds}s"
    if record.get("eval"):
        ev = record["eval"]
        line += f"\nperplexity {ev['perplexity_source']:.4g} -> {ev['perplexity']:.4g} (x{ev['perplexity_ratio']:.4f})"
        line += f" on {ev['examples']} held-out rows"
    typer.echo(line)
