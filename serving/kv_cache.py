"""A running batch: sequences that decode together, with one left-padded KV cache.

Sequences join after their prefill (`extend`: both caches are left-padded to the same length and stacked) and
leave when they finish (`keep`: rows are selected, then columns that are padding for every row are trimmed).
Each row's position is the number of real cache entries before it, so padding never shifts positions, and
virtual tokens (prompt tuning, prefix tuning) count as positions, as PEFT counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_MIN = 32  # columns a layer's buffer gets beyond what it holds, at least (and half its length, at most)


class GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values are views of a buffer with spare columns: a decode step writes its one
    column in place instead of copying the whole cache (transformers' `DynamicLayer` concatenates every step).
    Writes only go past the end of every view handed out, so an earlier view (a snapshot) keeps its values."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        held = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        length = held + key_states.shape[-2]
        if self._buffers is None or length > self._buffers[0].shape[-2]:
            self._buffers = tuple(
                _with_room(old, new, held, length + max(SPARE_MIN, length // 2))
                for old, new in ((self.keys, key_states), (self.values, value_states))
            )
        keys, values = self._buffers
        keys[:, :, held:length] = key_states
        values[:, :, held:length] = value_states
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        return self.keys, self.values


def _with_room(held: torch.Tensor, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """A [batch, heads, capacity, dim] buffer that starts with the `length` columns of `held`."""
    buffer = new.new_empty(new.shape[0], new.shape[1], capacity, new.shape[3])
    if length:
        buffer[:, :, :length] = held
    return buffer


class GrowingCache(DynamicCache):
    """transformers' `DynamicCache` made of `GrowingLayer`s, optionally filled with per-layer (keys, values)."""

    def __init__(self, tensors: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        layers = []
        for keys, values in tensors or []:
            layer = GrowingLayer()
            layer.update(keys, values)
            layers.append(layer)
        if layers:
            super(DynamicCache, self).__init__(layers=layers)
        else:
            super(DynamicCache, self).__init__(layer_class_to_replicate=GrowingLayer)


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_cache(tensors: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    return GrowingCache(tensors)


@dataclass
class RunningBatch:
    rows: list[Any]  # the engine's sequences, one per batch row
    cache: DynamicCache
    mask: torch.Tensor  # [rows, cache length]: 1 real entry, 0 padding
    next_tokens: torch.Tensor  # [rows]: sampled, not yet fed to the model

    def __len__(self) -> int:
        return len(self.rows)

    def step_inputs(self) -> dict[str, torch.Tensor | DynamicCache]:
        """Model kwargs that feed `next_tokens` and grow every row by one entry."""
        ones = torch.ones(len(self.rows), 1, dtype=self.mask.dtype)
        self.mask = torch.cat([self.mask, ones], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1
        return {
            "input_ids": self.next_tokens[:, None],
            "attention_mask": self.mask,
            "position_ids": positions,
            "past_key_values": self.cache,
        }

    def extend(self, other: RunningBatch) -> None:
        length = max(self.mask.shape[1], other.mask.shape[1])
        merged = []
        for (k1, v1), (k2, v2) in zip(cache_tensors(self.cache), cache_tensors(other.cache), strict=True):
            merged.append(
                (
                    torch.cat([_left_pad(k1, length), _left_pad(k2, length)], dim=0),
                    torch.cat([_left_pad(v1, length), _left_pad(v2, length)], dim=0),
                )
            )
        self.cache = make_cache(merged)
        self.mask = torch.cat([_left_pad_mask(self.mask, length), _left_pad_mask(other.mask, length)], dim=0)
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.rows = self.rows + other.rows

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order); drop columns that became padding everywhere."""
        part = self.select(indices)
        self.rows, self.cache, self.mask, self.next_tokens = part.rows, part.cache, part.mask, part.next_tokens

    def select(self, indices: list[int]) -> RunningBatch:
        """A new batch of these rows (in this order), without the columns that are padding for all of them."""
        index = torch.tensor(indices, dtype=torch.long)
        mask = self.mask[index]
        used = mask.sum(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        cache = make_cache([(k[index, :, start:], v[index, :, start:]) for k, v in cache_tensors(self.cache)])
        return RunningBatch([self.rows[i] for i in indices], cache, mask[:, start:], self.next_tokens[index])

    def snapshot(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """What `restore` needs to undo a step that raised (a forward only writes past the end of these views)."""
        return cache_tensors(self.cache), self.mask

    def restore(self, state: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]) -> None:
        self.cache, self.mask = make_cache(state[0]), state[1]


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[batch, heads, seq, dim] → zero-padded on the left of `seq` to `length`."""
    missing = length - tensor.shape[2]
    return F.pad(tensor, (0, 0, missing, 0)) if missing else tensor


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask.shape[1]
    return F.pad(mask, (missing, 0)) if missing else mask
