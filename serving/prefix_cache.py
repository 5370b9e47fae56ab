"""Prefix caching: the KV of prompt blocks already prefilled, reused by later prompts that start the same way
under the same loaded adapter (a system prompt, a few-shot preamble), so their prefill computes only the rest.

Prompts are cut into blocks of `block_tokens` tokens; block i is keyed by a hash chain,
`key_i = sha256(key_{i-1} || tokens of block i)`, whose seed is the owner: the adapter's per-load internal id
(`lf7`, new at every load and reload) or the base model's. So a different adapter, or another version loaded
under the same name, never finds this one's blocks: its chain starts from a different seed. Rows with virtual
tokens (prompt, prefix and P-tuning) are not cached: their prompt's KV depends on those tokens.

A lookup gives the longest run of cached blocks that leaves at least one prompt token to compute (its logits
choose the first token). Blocks are kept up to `limit_bytes` of keys and values, least recently used dropped
first; each is a copy, so a cached block never keeps a running batch's buffers alive. Model thread only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [kv_heads, tokens, head_dim]


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    prompt_tokens: int = 0  # tokens of the prompts looked up
    hit_tokens: int = 0  # of those, tokens whose KV came from the cache
    blocks: int = 0
    bytes: int = 0


class PrefixCache:
    def __init__(self, limit_bytes: int, block_tokens: int = 16):
        self.limit_bytes = limit_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, LayerKV] = OrderedDict()
        self._sizes: dict[bytes, int] = {}
        self.stats = PrefixCacheStats()

    def keys(self, owner: str, tokens: list[int]) -> list[bytes]:
        """The chain keys of the full blocks of `tokens` under `owner`."""
        chain, keys = hashlib.sha256(owner.encode()).digest(), []
        for start in range(0, len(tokens) - self.block_tokens + 1, self.block_tokens):
            block = tokens[start : start + self.block_tokens]
            chain = hashlib.sha256(chain + b"".join(t.to_bytes(8, "little", signed=True) for t in block)).digest()
            keys.append(chain)
        return keys

    def lookup(self, owner: str, tokens: list[int]) -> tuple[int, LayerKV | None]:
        """(how many leading tokens are cached, their KV per layer) for a prompt; (0, None) on a miss."""
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(tokens)
        found, keys = [], []
        for key in self.keys(owner, tokens[:-1]):  # the last token is always computed
            blocks = self._blocks.get(key)
            if blocks is None:
                break
            found.append(blocks)
            keys.append(key)
        if not found:
            return 0, None
        self._touch(keys)
        length = len(found) * self.block_tokens
        self.stats.hit_tokens += length
        layers = [
            (torch.cat([block[i][0] for block in found], dim=1), torch.cat([block[i][1] for block in found], dim=1))
            for i in range(len(found[0]))
        ]
        return length, layers

    def store(self, owner: str, tokens: list[int], kv_of: Callable[[], LayerKV]) -> None:
        """Keep the full blocks of a prefilled prompt not kept yet; `kv_of()` gives its KV (one column per token),
        asked for only when a block is new."""
        keys = self.keys(owner, tokens)
        if self.limit_bytes <= 0 or all(key in self._blocks for key in keys):
            self._touch([key for key in keys if key in self._blocks])
            return
        layers = kv_of()
        for index, key in enumerate(keys):
            if key in self._blocks:
                continue
            start, end = index * self.block_tokens, (index + 1) * self.block_tokens
            block = [(k[:, start:end].clone(), v[:, start:end].clone()) for k, v in layers]
            size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in block)
            if size > self.limit_bytes:
                return
            self._blocks[key], self._sizes[key] = block, size
            self.stats.bytes += size
        self._touch([key for key in keys if key in self._blocks])
        while self.stats.bytes > self.limit_bytes:
            oldest, _ = self._blocks.popitem(last=False)
            self.stats.bytes -= self._sizes.pop(oldest)
        self.stats.blocks = len(self._blocks)

    def _touch(self, chain: list[bytes]) -> None:
        """Most recently used, first blocks of the chain last: eviction takes a chain's tail before its head
        (a missing head would leave the rest of the chain unreachable)."""
        for key in reversed(chain):
            self._blocks.move_to_end(key)
