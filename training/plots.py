"""Loss curves of a run as a PNG (`report/loss.png`), from its metrics.jsonl: train and eval loss.

A restarted run logs the steps after its last checkpoint twice; the curve keeps the later (resumed) value of
each step, and a dashed line marks each restart.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_per_step(records: list[dict], key: str) -> list[tuple[int, float]]:
    values = {record["step"]: record[key] for record in records if key in record}
    return sorted(values.items())


def restarts(records: list[dict]) -> list[int]:
    return [record["step"] for record in records if record.get("event") == "train_begin" and record.get("resumed")]


def plot_loss_curves(metrics_path: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = latest_per_step(records, "loss")
    evaluation = latest_per_step(records, "eval_loss")
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if evaluation:
        axes.plot(*zip(*evaluation, strict=True), marker="o", label="eval loss")
    for index, step in enumerate(restarts(records)):
        axes.axvline(step, color="gray", linestyle="--", linewidth=1, label="resumed" if index == 0 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(metrics_path.parent.name)
    axes.grid(alpha=0.3)
    axes.legend()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png
