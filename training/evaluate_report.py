"""The files `lorafleet eval` writes into `<run>/report/`, each atomically, and the table it prints.

eval.json              every number: base, finetuned and baselines side by side, delta, verdict, n, task, data
eval.md                a before/after table with the baselines, the verdict, the plots, a few generations
eval_metrics.png       one small bar chart per metric (base vs fine-tuned)
eval_scatter.png       numeric tasks: predicted vs true, log-log, base, fine-tuned and each baseline
eval_generations.jsonl every example: input, reference, base answer, fine-tuned answer, baselines' answers
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from lorafleet.storage import write_bytes_atomic, write_text_atomic
from lorafleet.training.evaluate_baselines import output_verdict_line, verdict_line
from lorafleet.training.evaluate_metrics import (
    WITHIN_SHARE,
    is_improvement,
    parse_answer_number,
    parse_reference_number,
)

SHOWN_EXAMPLES = 5
SHOWN_CHARS = 160
LABELS = {
    "loss": "loss (response tokens)",
    "perplexity": "perplexity",
    "mae": "MAE",
    "rmsle": "RMSLE",
    "within_20pct": "within ±20%",
    "unparseable": "unparseable answers",
    "unparseable_rate": "unparseable share",
    "exact_match": "exact match",
    "accuracy": "accuracy (first line)",
    "macro_f1": "macro F1 (first line)",
    "bleu": "BLEU",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
}


def write_report(report_dir: Path, report: dict[str, Any], rows: list[dict[str, Any]]) -> list[Path]:
    report = finite(report)
    files = [report_dir / "eval.json", report_dir / "eval_generations.jsonl", report_dir / "eval_metrics.png"]
    write_text_atomic(files[0], json.dumps(report, indent=2) + "\n")
    write_text_atomic(files[1], "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_bytes_atomic(files[2], metric_bars(report))
    if report["task"] == "numeric":
        files.append(report_dir / "eval_scatter.png")
        write_bytes_atomic(files[-1], price_scatter(rows, report))
    else:
        (report_dir / "eval_scatter.png").unlink(missing_ok=True)  # a previous numeric eval's plot would mislead
    files.append(report_dir / "eval.md")
    write_text_atomic(files[-1], markdown(report, rows, [f.name for f in files if f.suffix == ".png"]))
    return files


def finite(node: Any) -> Any:
    """JSON has no inf/nan: they become null."""
    if isinstance(node, dict):
        return {key: finite(value) for key, value in node.items()}
    if isinstance(node, list):
        return [finite(value) for value in node]
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


def compared_metrics(report: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    base, tuned = report["base"], report["finetuned"]
    return [(key, base.get(key), tuned.get(key)) for key in tuned]


def beside_columns(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(column title, metrics) of the greedy answers shown beside a sampled first decoding; [] without one."""
    beside = report.get("beside")
    if not beside:
        return []
    return [(f"base {beside['decoding']}", beside["base"]), (f"fine-tuned {beside['decoding']}", beside["finetuned"])]


def model_titles(report: dict[str, Any]) -> tuple[str, str]:
    """The base and fine-tuned column titles, named with how they decoded when two decodings are shown."""
    if not report.get("beside"):
        return "base", "fine-tuned"
    mode = report["settings"]["decoding"].split(" ", 1)[0]
    return f"base {mode}", f"fine-tuned {mode}"


def format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def change(key: str, base: Any, tuned: Any) -> str:
    if not isinstance(base, int | float) or not isinstance(tuned, int | float):
        return ""
    better = is_improvement(key, base, tuned)
    verdict = {True: "better", False: "worse", None: "same"}[better]
    return f"{tuned - base:+.4g} ({verdict})"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The before/after table `lorafleet eval` prints, baselines beside, and the verdict against them."""
    data, baselines = report["data"], report.get("baselines") or {}
    extra = beside_columns(report) + [(name, metrics) for name, metrics in baselines.items()]
    width = max([14, *(len(title) + 2 for title, _ in extra)])
    base_title, tuned_title = model_titles(report)
    lines = [
        f"{report['run_id']}: {report['n']} examples of {data['source']} ({data['split']}), task {report['task']} "
        f"({report['task_source']}), decoding {report['settings'].get('decoding', 'greedy')}",
        f"{'metric':<24}{base_title:>{width}}{tuned_title:>{width}}"
        + "".join(f"{title:>{width}}" for title, _ in extra)
        + "  change",
    ]
    for key, base, tuned in compared_metrics(report):
        others = "".join(f"{format_value(metrics.get(key)):>{width}}" for _, metrics in extra)
        lines.append(
            f"{LABELS.get(key, key):<24}{format_value(base):>{width}}{format_value(tuned):>{width}}{others}  "
            f"{change(key, base, tuned)}"
        )
    seconds = report["seconds"]
    lines.append(f"time: base {seconds['base']}s, fine-tuned {seconds['finetuned']}s, total {seconds['total']}s")
    if "verdict" in report:
        lines.append(verdict_line(report["verdict"]))
    lines += [output_verdict_line(found) for found in report.get("verdicts") or []]
    return lines


def markdown(report: dict[str, Any], rows: list[dict[str, Any]], plots: list[str]) -> str:
    data, settings, baselines = report["data"], report["settings"], report.get("baselines") or {}
    extra = beside_columns(report) + [(name, metrics) for name, metrics in baselines.items()]
    base_title, tuned_title = model_titles(report)
    lines = [
        f"# Evaluation of {report['run_id']}",
        "",
        f"Base `{settings['base_model']}` vs the fine-tuned {settings['method']} adapter on the same "
        f"{report['n']} examples of `{data['source']}` (split {data['split']}; {data['truncated']} truncated to "
        f"{settings['max_seq_len']} tokens, {data['dropped']} dropped). Task **{report['task']}** "
        f"({report['task_source']}). Decoding: {settings.get('decoding', 'greedy')}, at most "
        f"{settings['max_new_tokens']} new tokens, answered by {settings.get('answered_by', 'transformers generate')}, "
        f"{settings['device']} {settings['precision']}.",
        "",
        f"| metric | {base_title} | {tuned_title} | " + "".join(f"{title} | " for title, _ in extra) + "change |",
        "| --- | ---: | ---: | " + "---: | " * len(extra) + "--- |",
    ]
    for key, base, tuned in compared_metrics(report):
        others = "".join(f"{format_value(metrics.get(key))} | " for _, metrics in extra)
        lines.append(
            f"| {LABELS.get(key, key)} | {format_value(base)} | {format_value(tuned)} | {others}"
            f"{change(key, base, tuned)} |"
        )
    if baselines:
        lines += ["", f"**{verdict_line(report.get('verdict'))}.**", ""]
        lines += [f"- {output_verdict_line(found)}" for found in report.get("verdicts") or []]
        lines += [""] if report.get("verdicts") else []
        lines.append("Baselines, fitted on the run's training rows and scored on the same examples:")
        lines += [f"- `{name}`: {how}" for name, how in report.get("baseline_methods", {}).items()]
    if report["task"] == "numeric":
        lines += [
            "",
            f"MAE and RMSLE are over answers that hold a number; within ±{WITHIN_SHARE:.0%} counts an "
            "answer without one as a miss, and `unparseable` counts those answers.",
        ]
    lines += ["", *[f"![{name}]({name})" for name in plots]]
    shown = [row for row in rows if row["reference"] is not None][:SHOWN_EXAMPLES]
    if shown:
        lines += ["", "## Examples", "", "| input | reference | base | fine-tuned |", "| --- | --- | --- | --- |"]
        lines += [
            "| " + " | ".join(cell(row[key]) for key in ("input", "reference", "base", "finetuned")) + " |"
            for row in shown
        ]
        lines += ["", "Every example: `eval_generations.jsonl`."]
    seconds = report["seconds"]
    lines += ["", f"Time: base {seconds['base']}s, fine-tuned {seconds['finetuned']}s, total {seconds['total']}s.", ""]
    return "\n".join(lines)


def cell(text: str | None) -> str:
    if text is None:
        return ""
    text = "".join(ch if ch.isprintable() else "\ufffd" for ch in " ".join(text.split())) or "(empty)"
    if len(text) > SHOWN_CHARS:
        text = text[: SHOWN_CHARS - 1] + "…"
    return text.replace("|", "\\|")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot().close(figure)
    return buffer.getvalue()


def metric_bars(report: dict[str, Any]) -> bytes:
    """One small panel per metric (their scales differ): base and fine-tuned bars."""
    plt = pyplot()
    metrics = [(k, b, t) for k, b, t in compared_metrics(report) if b is not None or t is not None]
    columns = min(4, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    for axis, (key, base, tuned) in zip(axes.flat, metrics, strict=False):
        values = [base or 0.0, tuned or 0.0]
        bars = axis.bar(["base", "fine-tuned"], values, color=["#9aa5b1", "#2f6fdf"])
        axis.bar_label(bars, labels=[format_value(base), format_value(tuned)], fontsize=8)
        axis.set_title(LABELS.get(key, key), fontsize=9)
        axis.set_ylim(min(0.0, *values), max(values) * 1.2 or 1.0)
        axis.tick_params(labelsize=8)
    for axis in list(axes.flat)[len(metrics) :]:
        axis.set_visible(False)
    figure.suptitle(f"{report['run_id']}: base vs fine-tuned ({report['n']} examples)", fontsize=10)
    return png_bytes(figure)


def price_scatter(rows: list[dict[str, Any]], report: dict[str, Any]) -> bytes:
    """Predicted vs true, log-log, for base, fine-tuned and each baseline; the ±20% band; unparseable counted."""
    plt = pyplot()
    names = list(report.get("baselines") or {})
    beside = report.get("beside")
    count = 2 + bool(beside) + len(names)
    figure, axes = plt.subplots(1, count, figsize=(5 * count, 4.6), sharex=True, sharey=True)
    truths = [parse_reference_number(row["reference"]) for row in rows]
    positive = [t for t in truths if t and t > 0]
    low, high = (min(positive), max(positive)) if positive else (1.0, 10.0)
    base_title, tuned_title = model_titles(report)
    sources = [
        ("base", base_title, "#9aa5b1", report["base"]),
        ("finetuned", tuned_title, "#2f6fdf", report["finetuned"]),
    ]
    if beside:
        sources.append(("finetuned_greedy", f"fine-tuned {beside['decoding']}", "#7a3fbf", beside["finetuned"]))
    sources += [(name, f"baseline {name}", "#d08c2f", report["baselines"][name]) for name in names]
    for axis, (key, title, color, metrics) in zip(axes, sources, strict=True):
        answers = [(row.get("baselines") or {}).get(key) if key in names else row.get(key) for row in rows]
        guesses = [parse_answer_number(answer or "") for answer in answers]
        points = [(t, g) for t, g in zip(truths, guesses, strict=True) if t and g and t > 0 and g > 0]
        missing = sum(1 for g in guesses if g is None)
        not_positive = sum(1 for g in guesses if g is not None and g <= 0)
        if points:
            axis.scatter(*zip(*points, strict=True), s=14, alpha=0.7, color=color)
            low = min(low, *(g for _, g in points))
            high = max(high, *(g for _, g in points))
        note = f"{missing} unparseable" + (f", {not_positive} ≤ 0 not shown" if not_positive else "")
        mae = metrics.get("mae")
        within = metrics.get("within_20pct")
        axis.set_title(f"{title}: MAE {format_value(mae)}, within ±20% {format_value(within)}\n({note})", fontsize=9)
    span = [low / 1.5, high * 1.5]
    for axis in axes:
        axis.plot(span, span, color="black", linewidth=1, label="predicted = true")
        axis.fill_between(
            span,
            [v * (1 - WITHIN_SHARE) for v in span],
            [v * (1 + WITHIN_SHARE) for v in span],
            color="green",
            alpha=0.12,
            label=f"±{WITHIN_SHARE:.0%}",
        )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlim(span)
        axis.set_ylim(span)
        axis.set_xlabel("true")
        axis.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("predicted")
    axes[0].legend(fontsize=8, loc="upper left")
    figure.suptitle(f"{report['run_id']}: predicted vs true ({report['n']} examples)", fontsize=10)
    return png_bytes(figure)
