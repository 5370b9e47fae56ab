"""The forward passes of the CPU engine: prefill newcomers, decode one token for every row of a running batch.

Prefill row layout (left-padded): [pad | prefix-tuning KV | pad | prompt-tuning embeddings | prompt tokens].
LoRA rows are routed per layer by the adapter store; prompt-learning rows carry their virtual tokens in their
own embeddings / KV prefix. Tokens are chosen here (None for a row whose logits are not finite).
"""

from __future__ import annotations

from typing import Any

import torch

from lorafleet.serving.adapter_store import AdapterStore
from lorafleet.serving.adapters import VirtualTokens
from lorafleet.serving.kv_cache import RunningBatch, make_cache
from lorafleet.serving.sampling import choose_tokens
from lorafleet.serving.scheduler import Sequence


class ModelRunner:
    def __init__(self, model: Any, store: AdapterStore, dtype: torch.dtype, pad_id: int):
        self.model = model
        self.store = store
        self.dtype = dtype
        self.pad_id = pad_id

    def prefill(self, key: str, seqs: list[Sequence]) -> tuple[RunningBatch, list[int | None]]:
        """Run the prompts of `seqs` together: their running batch and each one's first token."""
        virtual = [seq.adapter.virtual if seq.adapter else None for seq in seqs]
        embeds_len = [v.count if v is not None and v.embeds is not None else 0 for v in virtual]
        n_prefix = max((v.count for v in virtual if v is not None and v.prefix is not None), default=0)
        lengths = [len(seq.request.prompt_ids) + extra for seq, extra in zip(seqs, embeds_len, strict=True)]
        size, width = len(seqs), max(lengths)
        ids = torch.full((size, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(size, n_prefix + width, dtype=torch.long)
        for row, (seq, v, length) in enumerate(zip(seqs, virtual, lengths, strict=True)):
            ids[row, width - len(seq.request.prompt_ids) :] = torch.tensor(seq.request.prompt_ids)
            mask[row, n_prefix + width - length :] = 1
            if v is not None and v.prefix is not None:
                mask[row, n_prefix - v.count : n_prefix] = 1
        inputs: dict[str, Any] = {
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, n_prefix:],
        }
        inputs["past_key_values"] = make_cache(prefix_cache(virtual, n_prefix, self.dtype) if n_prefix else None)
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
        first = self.choose(out.logits[:, -1], seqs)
        return RunningBatch(rows=seqs, cache=out.past_key_values, mask=mask, next_tokens=torch.tensor([])), first

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


def prefix_cache(virtual: list[VirtualTokens | None], n_prefix: int, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [rows, kv_heads, n_prefix, head_dim]: each row's prefix right-aligned, zeros else."""
    template = next(v.prefix for v in virtual if v is not None and v.prefix is not None)
    layers = []
    for layer, (keys, _) in enumerate(template):
        k = torch.zeros(len(virtual), keys.shape[0], n_prefix, keys.shape[-1], dtype=dtype)
        v = torch.zeros_like(k)
        for row, tokens in enumerate(virtual):
            if tokens is not None and tokens.prefix is not None:
                k[row, :, n_prefix - tokens.count :] = tokens.prefix[layer][0]
                v[row, :, n_prefix - tokens.count :] = tokens.prefix[layer][1]
        layers.append((k, v))
    return layers
