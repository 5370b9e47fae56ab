"""The HF Trainer as lorafleet runs it: evaluation also reports perplexity.

`eval_perplexity = exp(eval_loss)` (mean token cross-entropy) joins the eval metrics before they are logged,
so metrics.jsonl, TensorBoard/W&B/MLflow, early stopping and best-checkpoint selection all see it.
"""

from __future__ import annotations

import math

from transformers import Trainer

MAX_EXPONENT = 700.0  # exp() overflows a float64 a little above 709


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < MAX_EXPONENT else math.inf


class FineTuneTrainer(Trainer):
    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        loss = output.metrics.get(f"{prefix}_loss")
        if loss is not None:
            output.metrics[f"{prefix}_perplexity"] = perplexity(float(loss))
        return output
