"""The HF Trainer as lorafleet runs it: the LM head only where labels are, and evaluation reports perplexity.

`labelled_logits` (training.logits: labelled) computes logits and loss only at labelled positions
(training/labelled_logits.py); the loss and gradients are those of the full computation.
`eval_perplexity = exp(eval_loss)` (mean token cross-entropy) joins the eval metrics before they are logged,
so metrics.jsonl, TensorBoard/W&B/MLflow, early stopping and best-checkpoint selection all see it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

from transformers import Trainer

from lorafleet.training.labelled_logits import LabelledLogits

MAX_EXPONENT = 700.0  # exp() overflows a float64 a little above 709


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < MAX_EXPONENT else math.inf


class FineTuneTrainer(Trainer):
    def __init__(self, *args, labelled_logits: LabelledLogits | None = None, **kwargs):
        if labelled_logits is not None:
            kwargs["compute_loss_func"] = labelled_logits.loss
        super().__init__(*args, **kwargs)
        self.labelled_logits = labelled_logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labelled = self.labelled_logits is not None and "labels" in inputs
        with self.labelled_logits.at(inputs["labels"]) if labelled else nullcontext():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        loss = output.metrics.get(f"{prefix}_loss")
        if loss is not None:
            output.metrics[f"{prefix}_perplexity"] = perplexity(float(loss))
        return output
