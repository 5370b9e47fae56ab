"""The LM head only where the loss is: logits at the positions whose next token carries a label.

A causal LM computes logits (hidden × vocabulary) at every position, but the loss reads only the positions
whose next token is a label: with a short answer after a longer prompt, 10–20% of them. On SmolLM2-135M the
head is a 576 × 49,152 matmul, about a fifth of a training step's FLOPs, followed by a log-softmax over
49,152 values per position, which is memory-bound and costs as much again on a CPU.

    labelled = LabelledLogits(model)              # a forward pre-hook on the model's output embedding
    with labelled.at(labels):                     # labels: (batch, length), -100 where there is no loss
        outputs = model(input_ids=..., ...)       # outputs.logits: (1, n, vocabulary), n labelled positions
        loss = labelled.loss(outputs, labels, num_items_in_batch)

While positions are set, the hook cuts the head's input (batch, length, hidden) to the labelled rows,
(1, n, hidden); with none set (generation, any other use) the head runs as it always does. The loss is the
one transformers computes (`ForCausalLMLoss`): next-token cross-entropy in fp32, summed and divided by the
number of labelled tokens of the whole accumulated batch when the Trainer passes it, their mean otherwise.
Same loss and gradients as the full computation (tests/test_labelled_logits.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from lorafleet.training.data_packing import IGNORE_INDEX


class LabelledLogits:
    def __init__(self, model: torch.nn.Module):
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError("training.logits: labelled needs a model with an output embedding (an LM head)")
        self._positions: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None
        head.register_forward_pre_hook(self._select)

    @contextmanager
    def at(self, labels: torch.Tensor) -> Iterator[None]:
        """Compute the head only at the positions whose next token in `labels` is not IGNORE_INDEX."""
        following = labels[:, 1:]
        labelled = following != IGNORE_INDEX
        mask = F.pad(labelled, (0, 1), value=False)  # the last position predicts nothing
        self._positions = mask.flatten().nonzero().squeeze(1)
        self._targets = following[labelled]
        try:
            yield
        finally:
            self._positions = self._targets = None

    def _select(self, module, args):
        if self._positions is None:
            return None
        (hidden,) = args
        return (hidden.flatten(0, -2).index_select(0, self._positions.to(hidden.device)).unsqueeze(0),)

    def loss(self, outputs, labels, num_items_in_batch=None) -> torch.Tensor:
        """The `compute_loss_func` of the HF Trainer: cross-entropy of the selected logits."""
        if self._targets is None:
            raise RuntimeError("LabelledLogits.loss runs inside LabelledLogits.at(labels)")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        logits = logits.reshape(-1, logits.shape[-1]).float()
        targets = self._targets.to(logits.device)
        if num_items_in_batch is None:
            return F.cross_entropy(logits, targets, reduction="mean")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(logits.device)
        return F.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch
