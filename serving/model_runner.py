"""The forward passes of the CPU engine: prefill newcomers, decode one token for every row of a running batch.

Prefill row layout (left-padded): [pad | past | pad | prompt-tuning embeddings | prompt tokens], where a row's
past is its prefix-tuning KV or the KV of its prompt's first tokens found in the prefix cache (then only the rest
of the prompt is fed).
LoRA rows are routed per layer by the adapter store; prompt-learning rows carry their virtual tokens in their
own embeddings / KV prefix. Tokens are chosen here (None for a row whose logits are not finite).
"""

from __future__ import annotations

from typing import Any

import torch

from lorafleet.serving.adapter_store import BASE, AdapterStore
from lorafleet.serving.kv_cache import RunningBatch, cache_tensors, make_cache
from lorafleet.serving.prefix_cache import LayerKV, PrefixCache
from lorafleet.serving.sampling import choose_tokens
from lorafleet.serving.scheduler import Sequence


class ModelRunner:
    def __init__(self, model: Any, store: AdapterStore, dtype: torch.dtype, pad_id: int, prefixes: PrefixCache | None):
        self.model = model
        self.store = store
        self.dtype = dtype
        self.pad_id = pad_id
        self.prefixes = prefixes
        self.prefilled_rows = 0  # prompts run through the model (the n choices of one request count once)

    def prefill(self, key: str, seqs: list[Sequence]) -> tuple[RunningBatch, list[int | None]]:
        """Run the prompts of `seqs` together: their running batch and each one's first token.

        The choices of one request (one `family`) run their prompt once; its logits and KV rows are then copied
        to each sibling, which draws its first token with its own generator.
        """
        leaders: dict[int, int] = {}
        unique: list[Sequence] = []
        row_of: list[int] = []
        for seq in seqs:
            family = seq.request.family
            if family is None or id(family) not in leaders:
                if family is not None:
                    leaders[id(family)] = len(unique)
                unique.append(seq)
            row_of.append(leaders[id(family)] if family is not None else len(unique) - 1)
        logits, cache, mask, cacheable = self._run_prompts(key, unique)
        self.prefilled_rows += len(unique)
        if len(unique) < len(seqs):
            index = torch.tensor(row_of)
            logits, mask = logits[index], mask[index]
            cache = make_cache([(k[index], v[index]) for k, v in cache_tensors(cache)])
            cacheable = [cacheable[row] for row in row_of]
        first = self.choose(logits, seqs)
        batch = RunningBatch(rows=seqs, cache=cache, mask=mask, next_tokens=torch.tensor([]))
        self._keep_prompts(batch, [ok and token is not None for ok, token in zip(cacheable, first, strict=True)])
        return batch, first

    def _run_prompts(self, key: str, seqs: list[Sequence]):
        """(last logits [rows, vocab], KV cache, mask, whether each row's prompt KV may be cached)."""
        virtual = [seq.adapter.virtual if seq.adapter else None for seq in seqs]
        cached = [self._cached(seq) if v is None else (0, None) for seq, v in zip(seqs, virtual, strict=True)]
        # What goes before a row's prompt tokens in the cache: its prefix-tuning KV, or its cached prompt prefix
        past = [
            v.prefix if v is not None and v.prefix is not None else kv
            for v, (_, kv) in zip(virtual, cached, strict=True)
        ]
        past_len = [
            v.count if v is not None and v.prefix is not None else n for v, (n, _) in zip(virtual, cached, strict=True)
        ]
        fed = [seq.request.prompt_ids[n:] for seq, (n, _) in zip(seqs, cached, strict=True)]
        embeds_len = [v.count if v is not None and v.embeds is not None else 0 for v in virtual]
        n_prefix = max(past_len, default=0)
        lengths = [len(tokens) + extra for tokens, extra in zip(fed, embeds_len, strict=True)]
        size, width = len(seqs), max(lengths)
        ids = torch.full((size, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(size, n_prefix + width, dtype=torch.long)
        for row, (tokens, length) in enumerate(zip(fed, lengths, strict=True)):
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, n_prefix + width - length :] = 1
            mask[row, n_prefix - past_len[row] : n_prefix] = 1
        inputs: dict[str, Any] = {
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, n_prefix:],
            "past_key_values": make_cache(right_aligned(past, n_prefix, self.dtype) if n_prefix else None),
        }
        with self.store.routing(key, [seq.adapter for seq in seqs]):
            if any(embeds_len):
                embeds = self.model.get_input_embeddings()(ids)  # inside: LoRA on embeddings routes per row
                for row, (v, extra, length) in enumerate(zip(virtual, embeds_len, lengths, strict=True)):
                    if extra:
                        embeds[row, width - length : width - length + extra] = v.embeds
                inputs["inputs_embeds"] = embeds
            else:
                inputs["input_ids"] = ids
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values, mask, [v is None for v in virtual]

    def _cached(self, seq: Sequence) -> tuple[int, LayerKV | None]:
        if self.prefixes is None:
            return 0, None
        return self.prefixes.lookup(owner(seq), seq.request.prompt_ids)

    def _keep_prompts(self, batch: RunningBatch, cacheable: list[bool]) -> None:
        """Put the prompt blocks of the rows just prefilled (not virtual-token rows, not NaN rows) in the cache."""
        if self.prefixes is None:
            return
        layers = cache_tensors(batch.cache)
        for row, seq in enumerate(batch.rows):
            if cacheable[row]:
                real = batch.mask[row].bool()  # the row's own entries: its whole prompt, one column per token
                self.prefixes.store(
                    owner(seq),
                    seq.request.prompt_ids,
                    lambda row=row, real=real: [(k[row][:, real], v[row][:, real]) for k, v in layers],
                )

    def decode(self, key: str, batch: RunningBatch) -> list[int | None]:
        """One decode step of `batch`; when it raises, `batch` is as it was before (no token was handed out)."""
        state = batch.snapshot()
        try:
            inputs = batch.step_inputs()
            with self.store.routing(key, [seq.adapter for seq in batch.rows]):
                out = self.model(**inputs, use_cache=True)
            tokens = self.choose(out.logits[:, -1], batch.rows)
        except Exception:
            batch.restore(state)
            raise
        batch.cache = out.past_key_values
        return tokens

    def choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
        return choose_tokens(logits.float(), [s.request.params for s in seqs], [s.generator for s in seqs])


def owner(seq: Sequence) -> str:
    """Whose KV a row's prompt has: the adapter's load (a new id at every load) or the base model's."""
    return seq.adapter.internal if seq.adapter is not None else BASE


def right_aligned(past: list[LayerKV | None], n_prefix: int, dtype) -> LayerKV:
    """Per layer (keys, values) [rows, kv_heads, n_prefix, head_dim]: each row's past right-aligned, zeros else."""
    template = next(layers for layers in past if layers is not None)
    out = []
    for layer, (keys, _) in enumerate(template):
        k = torch.zeros(len(past), keys.shape[0], n_prefix, keys.shape[-1], dtype=dtype)
        v = torch.zeros_like(k)
        for row, layers in enumerate(past):
            if layers is not None:
                count = layers[layer][0].shape[1]
                k[row, :, n_prefix - count :] = layers[layer][0]
                v[row, :, n_prefix - count :] = layers[layer][1]
        out.append((k, v))
    return out
