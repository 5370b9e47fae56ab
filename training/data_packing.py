"""Packing whole examples into sequences, and the collator that pads a batch for the HF Trainer.

Packing is best-fit decreasing: examples, longest first, each go into the fullest sequence that still has
room for all of it (a new sequence when none has), so no example is ever split. `position_ids` restart at 0
for each example. Given position_ids and *no* attention_mask (and no KV cache), transformers'
`masking_utils.find_packed_sequence_indices` starts a new segment wherever a position does not follow the
previous one, and the mask becomes block-diagonal causal: a token attends only within its own example. So
the collator leaves out attention_mask for packed batches. The model must run with use_cache=False (the
Trainer sets `config.use_cache = args.use_cache`, False by default); with a cache, detection is skipped.
The first label of each packed example is -100: it would otherwise be a target of the previous example.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

Example = dict[str, list[int]]


def pack(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Bin-pack examples (each at most `max_seq_len` tokens) into sequences of at most `max_seq_len`."""
    order = sorted(range(len(examples)), key=lambda index: -len(examples[index]["input_ids"]))
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (free tokens, bin index), ascending
    for index in order:
        size = len(examples[index]["input_ids"])
        if size > max_seq_len:
            raise ValueError(f"example of {size} tokens does not fit max_seq_len={max_seq_len}; truncate first")
        slot = bisect.bisect_left(rooms, (size, -1))
        if slot == len(rooms):
            bins.append([index])
            room, target = max_seq_len - size, len(bins) - 1
        else:
            room, target = rooms.pop(slot)
            bins[target].append(index)
            room -= size
        if room > 0:
            bisect.insort(rooms, (room, target))
    return [_concatenate([examples[index] for index in members]) for members in bins]


def _concatenate(examples: list[Example]) -> Example:
    packed: Example = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        packed["input_ids"] += example["input_ids"]
        packed["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        packed["position_ids"] += list(range(len(example["input_ids"])))
    return packed


def packing_efficiency(sequences: list[Example], max_seq_len: int) -> float:
    """Share of the sequences' token slots (max_seq_len each) that hold real tokens."""
    if not sequences:
        return 0.0
    return sum(len(sequence["input_ids"]) for sequence in sequences) / (len(sequences) * max_seq_len)


@dataclass(frozen=True)
class Collator:
    """Right-pads a batch: input_ids with the pad id, labels with -100.

    Unpacked batches get an attention_mask. Packed batches (examples with position_ids) get their
    position_ids padded with a fresh 0, 1, 2, ... run (the padding forms its own segment) and no
    attention_mask, so transformers builds block-diagonal causal attention from the position_ids.
    """

    pad_token_id: int

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("Collator needs a pad token id; set tokenizer.pad_token (e.g. to the EOS token)")

    def __call__(self, features: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)
        packed = "position_ids" in features[0]
        if any(("position_ids" in feature) != packed for feature in features):
            raise ValueError("a batch mixes packed and unpacked examples")
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        batch["position_ids" if packed else "attention_mask"] = []
        for feature in features:
            length = len(feature["input_ids"])
            padding = width - length
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * padding)
            batch["labels"].append(list(feature["labels"]) + [IGNORE_INDEX] * padding)
            if packed:
                batch["position_ids"].append(list(feature["position_ids"]) + list(range(padding)))
            else:
                batch["attention_mask"].append([1] * length + [0] * padding)
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}
