"""The live table of a running sweep: one row per trial (status, parameters, steps, metric) and the best so far.

A Ray Tune callback on the driver. On a terminal the table is redrawn in place; in a log (CI, `| tee`) a new
copy is printed when a trial starts or ends, and at most every `PROGRESS_EVERY_S` while trials report.
"""

from __future__ import annotations

import math
import sys
import time

from ray.tune import Callback

from lorafleet.sweep_config import SweepSection

PROGRESS_EVERY_S = 30.0
REDRAW_EVERY_S = 1.0


class SweepTable(Callback):
    def __init__(self, sweep: SweepSection, sweep_id: str, *, max_steps: int | None = None):
        self.sweep = sweep
        self.sweep_id = sweep_id
        self.max_steps = max_steps
        self._rows: dict[str, dict] = {}
        self._best: tuple[float, str] | None = None
        self._printed_lines = 0
        self._last_print = 0.0

    def __getstate__(self):  # pickled into Tune's experiment state: only the settings travel
        return {"sweep": self.sweep, "sweep_id": self.sweep_id, "max_steps": self.max_steps}

    def __setstate__(self, state):
        self.__init__(state["sweep"], state["sweep_id"], max_steps=state["max_steps"])

    def on_step_begin(self, iteration, trials, **info):
        if iteration == 0 or not self._rows:  # a resumed sweep: the trials Tune restored, as they stand
            for trial in trials:
                if trial.status in ("TERMINATED", "ERROR"):
                    self._update(trial, "failed" if trial.status == "ERROR" else "ended", trial.last_result)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial, "running")
        self._show(force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, "running", result)
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step")
        stopped = self.max_steps is not None and isinstance(step, int) and step < self.max_steps
        self._update(trial, "stopped early" if stopped else "finished")
        self._show(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, "failed")
        self._show(force=True)

    def on_experiment_end(self, trials, **info):
        self._show(force=True)

    def _update(self, trial, status: str, result: dict | None = None) -> None:
        name = f"t{int(trial.trial_id.rsplit('_', 1)[-1])}"  # as training/sweep.py names trials
        row = self._rows.setdefault(name, {"status": status, "step": None, "value": None})
        row["status"] = status
        row["config"] = trial.config
        if result:
            row["step"] = result.get("step", row["step"])
            value = result.get(self.sweep.metric)
            if isinstance(value, int | float) and math.isfinite(value):
                row["value"] = value
                score = value if self.sweep.mode == "min" else -value
                if self._best is None or score < self._best[0]:
                    self._best = (score, name)

    def _show(self, force: bool = False) -> None:
        now = time.monotonic()
        tty = sys.stdout.isatty()
        if not force and now - self._last_print < (REDRAW_EVERY_S if tty else PROGRESS_EVERY_S):
            return
        self._last_print = now
        lines = self.render()
        if tty and self._printed_lines:
            sys.stdout.write(f"\x1b[{self._printed_lines}F\x1b[J")  # back to the table's first line, clear below
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        self._printed_lines = len(lines) if tty else 0

    def render(self) -> list[str]:
        metric, paths = self.sweep.metric, list(self.sweep.space)
        header = ["trial", "status", *paths, "step", metric]
        body = []
        for name in sorted(self._rows, key=lambda n: int(n[1:])):
            row = self._rows[name]
            config = row.get("config") or {}
            cells = [name, row["status"], *(_fmt(config.get(p)) for p in paths), _fmt(row["step"]), _fmt(row["value"])]
            body.append(cells)
        widths = [max(len(str(c)) for c in column) for column in zip(header, *body, strict=True)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in [header, *body]]
        best = f"best so far: {self._best[1]} {metric} {_fmt(self._rows[self._best[1]]['value'])}" if self._best else ""
        return [f"sweep {self.sweep_id}", *lines, best or "best so far: -"]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
