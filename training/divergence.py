"""Fail a run whose loss goes NaN or infinite, instead of finishing it "succeeded" with NaN weights.

A learning rate far too high (or a bad row of labels) can turn the loss non-finite; after that every update
writes NaN into the adapter and the run still ends normally. The logged loss is the mean over all ranks, so
every rank sees the same value and stops at the same step; the error reaches the CLI as it was raised.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from lorafleet.errors import LorafleetError

WATCHED = ("loss", "grad_norm", "eval_loss")


class TrainingDiverged(LorafleetError):
    """The loss (or the gradient norm) became NaN or infinite: the run failed, its weights are not kept."""

    exit_code = 1


class DivergenceGuard(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in WATCHED:
            value = (logs or {}).get(key)
            if isinstance(value, int | float) and not math.isfinite(value):
                raise TrainingDiverged(
                    f"training diverged: {key} became {value} at step {state.global_step} (learning rate "
                    f"{args.learning_rate:g}); lower training.learning_rate or check the data, then start a new run"
                )
