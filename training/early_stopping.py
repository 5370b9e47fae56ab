"""Stop a run whose watched eval metric stopped improving.

Every rank sees the same (all-reduced) eval metrics, so every rank stops at the same step and Ray's
report count stays equal across workers. A resumed run replays the evaluations in the restored trainer state,
so patience counts across restarts as if the run had never stopped.
"""

from __future__ import annotations

from transformers import TrainerCallback

from lorafleet.config import EarlyStoppingSection


class EarlyStopping(TrainerCallback):
    def __init__(self, settings: EarlyStoppingSection):
        self.settings = settings
        self.best: float | None = None
        self.evaluations_without_improvement = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.best, self.evaluations_without_improvement = None, 0
        for entry in state.log_history:
            if self.settings.metric in entry:
                self._record(entry[self.settings.metric])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.settings.metric)
        if value is None:
            raise KeyError(
                f"training.early_stopping.metric {self.settings.metric!r} is not among the eval metrics: "
                f"{', '.join(sorted(metrics or {}))}"
            )
        self._record(value)
        if self.evaluations_without_improvement >= self.settings.patience:
            control.should_training_stop = True
            control.should_save = True
            state.log_history.append({"early_stopped_at": state.global_step, "step": state.global_step})

    def _record(self, value: float) -> None:
        if self._improved(value):
            self.best = value
            self.evaluations_without_improvement = 0
        else:
            self.evaluations_without_improvement += 1

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.settings.mode == "min":
            return value < self.best - self.settings.min_delta
        return value > self.best + self.settings.min_delta
