"""`lorafleet eval RUN --compare fp32,int8,int4,gptq-w4a16`: the run's merged model in each variant, side by side.

One linear story: the run's eval examples (as `lorafleet eval` builds them) → for each variant a model folder
in a temporary directory (fp32: the merge in float32; the others: `lorafleet quantize` of the run, GPTQ
calibrated on the run's training rows) → each folder measured by `measure` (the CLI's: a process of its own
serving it on the CPU engine, lorafleet/cli/quantization_probe.py): response loss and perplexity, greedy
answers and the task metrics, prefill and decode tokens/s, weight memory, resident and peak memory →
report/quantization.json, .md and .png. The folders are removed afterwards; their file sizes are in the report.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from lorafleet.config import CompareVariant, EvalSection
from lorafleet.errors import ConfigError
from lorafleet.runs import FinishedRun

VARIANTS = get_args(CompareVariant)  # fp32 and lorafleet.quantization's METHODS (a test holds them equal)
COLUMNS = [  # (report key, heading, format)
    ("perplexity_stored", "perplexity (weights as stored)", "{:.4g}"),
    ("perplexity_stored_ratio", "vs fp32", "{:.4f}x"),
    ("perplexity", "perplexity (CPU engine)", "{:.4g}"),
    ("perplexity_ratio", "vs fp32", "{:.4f}x"),
    ("task_metric", "task metric", "{:.4g}"),
    ("prefill_tokens_per_s", "prefill tok/s", "{:.0f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("decode_speedup", "decode vs fp32", "{:.2f}x"),
    ("weights_mb", "weights MB", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("file_mb", "files MB", "{:.1f}"),
]
PRIMARY_METRIC = {"numeric": "mae", "classification": "accuracy", "text": "rougeL"}


@dataclass(frozen=True)
class ProbeRequest:
    """What each variant is measured on (lorafleet/cli/quantization_probe.py measures it on the CPU engine)."""

    examples: list[Any]  # EvalExample: input_ids, labels, prompt_ids
    batch_size: int
    pad_id: int
    max_new_tokens: int
    threads: int | None = None


Measure = Callable[[str, ProbeRequest], dict[str, Any]]  # (model folder, request) -> the probe's measurements


def parse_variants(text: str | list[str]) -> list[str]:
    variants = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"--compare {','.join(variants)}: use a comma-separated list of {', '.join(VARIANTS)}")
    return list(dict.fromkeys(["fp32", *variants]))  # fp32 first: every ratio is against it


def compare_quantizations(
    run: FinishedRun, settings: EvalSection, variants: list[str], measure: Measure
) -> dict[str, Any]:
    from lorafleet.training.evaluate import choose_task
    from lorafleet.training.evaluate_data import load_eval_data
    from lorafleet.training.model import load_tokenizer

    started = time.monotonic()
    tokenizer = load_tokenizer(run.job.model)
    data = load_eval_data(run.job, settings, tokenizer)
    task, _ = choose_task(settings.task, data)
    request = ProbeRequest(data.examples, settings.batch_size, tokenizer.pad_token_id, settings.max_new_tokens)
    rows: dict[str, dict[str, Any]] = {}
    work = Path(tempfile.mkdtemp(prefix="lorafleet-compare-"))
    try:
        for variant in variants:
            print(f"[compare] {variant}: building the model folder", file=sys.stderr, flush=True)
            folder = build_variant(run, variant, work / variant)
            print(f"[compare] {variant}: measuring it as the CPU engine serves it", file=sys.stderr, flush=True)
            measured = measure(str(folder), request)
            measured["file_mb"] = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
            rows[variant] = measured
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return build_comparison(run, data, task, rows, round(time.monotonic() - started, 1))


def build_variant(run: FinishedRun, variant: str, out: Path) -> Path:
    if variant == "fp32":
        from lorafleet.training.merge import merge_run

        return merge_run(run, out, dtype="fp32").out_dir
    from lorafleet.training.quantize import QuantizeSettings, quantize_model

    return quantize_model(str(run.path), QuantizeSettings(method=variant, out=out)).out_dir


def build_comparison(run, data, task: str | None, rows: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    from lorafleet.training.evaluate_metrics import task_metrics

    reference = rows["fp32"]
    metric = PRIMARY_METRIC.get(task or "")
    variants = {}
    for name, row in rows.items():
        perplexity, stored = (math.exp(min(row[key], 700)) for key in ("loss", "loss_stored"))
        metrics = task_metrics(task, row["answers"], data.references) if task and data.references else {}
        variants[name] = {
            "quantization": row["quantization"],
            "loss": row["loss"],
            "perplexity": perplexity,
            "perplexity_ratio": perplexity / math.exp(reference["loss"]),
            "perplexity_stored": stored,
            "perplexity_stored_ratio": stored / math.exp(reference["loss_stored"]),
            "loss_stored": row["loss_stored"],
            "task_metrics": metrics,
            "task_metric": metrics.get(metric) if metric else None,
            "decode_speedup": row["decode_tokens_per_s"] / reference["decode_tokens_per_s"],
            **{k: row[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "weights_mb", "rss_mb")},
            **{k: row[k] for k in ("peak_rss_mb", "file_mb")},
            "answers": row["answers"][:5],
        }
    return {
        "run_id": run.run_id,
        "n": len(data.examples),
        "task": task,
        "task_metric": metric,
        "variants": variants,
        "seconds": seconds,
        "notes": "Each variant measured in its own process as `lorafleet serve --engine cpu` runs it. Perplexity "
        "as stored: the folder's weights in float arithmetic (vLLM's weight-only kernels); CPU engine: its int8 "
        "kernels (per-token int8 activations, int8 LM head), which also give the task metric and the speeds. "
        "Decode: 16 rows at once; prefill: one 256-token prompt.",
    }


def write_comparison(report_dir: Path, report: dict[str, Any]) -> list[Path]:
    import json

    from lorafleet.storage import write_bytes_atomic, write_text_atomic
    from lorafleet.training.evaluate_report import finite

    files = [report_dir / f"quantization.{suffix}" for suffix in ("json", "md", "png")]
    write_text_atomic(files[0], json.dumps(finite(report), indent=2) + "\n")
    write_text_atomic(files[1], comparison_markdown(report))
    write_bytes_atomic(files[2], comparison_plot(report))
    return files


def comparison_markdown(report: dict[str, Any]) -> str:
    metric = report["task_metric"] or "-"
    headings = [heading.replace("task metric", f"task ({metric})") for _, heading, _ in COLUMNS]
    lines = [
        f"# Quantization comparison: {report['run_id']}",
        "",
        f"{report['n']} eval examples, task {report['task'] or 'none'}. {report['notes']}",
        "",
        "| variant | " + " | ".join(headings) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, row in report["variants"].items():
        cells = ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", "![quantization](quantization.png)", ""])


def comparison_plot(report: dict[str, Any]) -> bytes:
    """One small panel per measure (their scales differ), the variants side by side, fp32 in grey."""
    from lorafleet.training.evaluate_report import png_bytes, pyplot

    plt = pyplot()
    panels = [
        ("perplexity", "perplexity (CPU engine)"),
        ("prefill_tokens_per_s", "prefill tokens/s"),
        ("decode_tokens_per_s", "decode tokens/s"),
        ("weights_mb", "weights in memory, MB"),
        ("peak_rss_mb", "peak RSS, MB"),
        ("file_mb", "files, MB"),
    ]
    if report["task_metric"]:
        panels.insert(1, ("task_metric", report["task_metric"]))
    names = list(report["variants"])
    columns = 4
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.9 * rows), squeeze=False)
    for axis, (key, title) in zip(axes.flat, panels, strict=False):
        values = [report["variants"][name].get(key) or 0.0 for name in names]
        bars = axis.bar(names, values, color=["#9aa5b1", *["#2f6fdf"] * (len(names) - 1)])
        axis.bar_label(bars, labels=[f"{value:.4g}" for value in values], fontsize=7)
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=7, axis="x", rotation=30)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(f"{report['run_id']}: quantized variants ({report['n']} examples)", fontsize=10)
    return png_bytes(figure)
