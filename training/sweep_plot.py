"""`sweep.png`: the metric against each swept parameter (one panel each), and every trial's metric curve."""

from __future__ import annotations

import io

from lorafleet.config import JobConfig
from lorafleet.training.sweep_report import TrialRow

MARKERS = {"finished": "o", "stopped early": "x", "failed": "s"}


def plot_sweep(rows: list[TrialRow], job: JobConfig) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = job.sweep
    paths = list(sweep.space)
    figure, axes = plt.subplots(1, len(paths) + 1, figsize=(4.2 * (len(paths) + 1), 3.8), squeeze=False)
    for axis, path in zip(axes[0], paths, strict=False):
        _parameter_panel(axis, rows, path, sweep.metric, log=sweep.space[path].kind == "loguniform")
    curves = axes[0][-1]
    for row in rows:
        if row.curve:
            steps, values = zip(*row.curve, strict=True)
            style = "--" if row.status != "finished" else "-"
            curves.plot(steps, values, style, marker=".", label=f"t{row.trial} ({row.status})")
    curves.set_xlabel("step")
    curves.set_ylabel(sweep.metric)
    curves.set_title("every trial")
    curves.grid(alpha=0.3)
    if any(row.curve for row in rows):
        curves.legend(fontsize=7)
    figure.suptitle(f"sweep: {sweep.metric} ({sweep.mode})")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out.getvalue()


def _parameter_panel(axis, rows: list[TrialRow], path: str, metric: str, *, log: bool) -> None:
    numeric = all(isinstance(row.parameters.get(path), int | float) for row in rows if row.last is not None)
    labels: list[str] = []
    for status, marker in MARKERS.items():
        points = [(row.parameters.get(path), row.last) for row in rows if row.status == status and row.last is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        if not numeric:  # choices of strings, lists or mappings: one slot per distinct value
            labels = labels or sorted({str(row.parameters.get(path)) for row in rows})
            xs = [labels.index(str(x)) for x in xs]
        axis.scatter(xs, ys, marker=marker, label=status)
    if labels:
        axis.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
    values = [row.parameters.get(path) for row in rows if row.last is not None]
    wide = numeric and values and min(values) > 0 and max(values) / min(values) >= 100
    if numeric and (log or wide):
        axis.set_xscale("log")
    axis.set_xlabel(path)
    axis.set_ylabel(f"{metric} (last)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
