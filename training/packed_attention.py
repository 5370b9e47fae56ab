"""Attention for packed batches on CPU: each example's causal attention is computed on its own span.

Given packed position_ids and no attention_mask (see data_packing.py), transformers' `sdpa` builds a
block-diagonal (batch, 1, L, L) mask and scores every query against every key of the row, most of them then
masked out: with k examples of similar length in a row, about k times the attention work of the examples
themselves, and SDPA cannot use its causal kernel with a mask. Here each example's span (position_ids
restart at 0 where it begins) runs its own `is_causal` SDPA, so the work is the sum of len² over the
examples, and no mask is built. The result is the same attention (tests/test_data.py compares losses).

Anything else (an attention_mask, a KV cache, queries and keys of different lengths: unpacked batches,
prefix tuning, generation) goes to transformers' own SDPA and mask, unchanged.

    use_packed_attention(model)   # the worker does this for `data.packing: true` on a CPU device
"""

from __future__ import annotations

import torch

NAME = "lorafleet_packed_sdpa"
# Decoder families whose layers hand position_ids on to the attention function (checked in transformers 5).
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "granite", "olmo2"})


def example_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the runs of consecutive positions in one row: its examples (and the collator's padding)."""
    starts = (position_ids[1:] != position_ids[:-1] + 1).nonzero().flatten().add(1).tolist()
    bounds = [0, *starts, position_ids.numel()]
    return [end - start for start, end in zip(bounds, bounds[1:], strict=False)]


def packed_sdpa_forward(module, query, key, value, attention_mask, *, position_ids=None, **kwargs):
    """An `AttentionInterface` function: per-example causal SDPA when the batch is packed, plain SDPA otherwise.

    query: (batch, heads, L, head_dim); key, value: (batch, kv_heads, L, head_dim); returns (batch, L, heads,
    head_dim) and no weights, as `sdpa_attention_forward` does. Rows and examples are cut with unbind/split,
    whose backward is one stack/cat (slicing would add a zero-filled full-size gradient per example).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    if attention_mask is not None or position_ids is None or key.shape[2] != length or length == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    for positions, q, k, v in zip(position_ids, query, key, value, strict=True):
        lengths = example_lengths(positions)
        pieces = [
            sdpa_attention_forward(module, q_[None], k_[None], v_[None], None, is_causal=True, **kwargs)[0]
            for q_, k_, v_ in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), strict=True)
        ]
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0), None


def packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """The mask for `NAME`: none when there is no padding mask and no cache offset (the attention function finds
    the examples from position_ids); transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    no_offset = not kwargs.get("q_offset") and not kwargs.get("kv_offset")
    if attention_mask is None and q_length == kv_length and no_offset and not args:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)


def use_packed_attention(model) -> bool:
    """Switch a model on `sdpa` to the per-example attention; False (unchanged) for other attention
    implementations, model families not in MODEL_TYPES, and sliding-window attention."""
    config = model.config
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if getattr(config, "_attn_implementation", None) != "sdpa" or config.model_type not in MODEL_TYPES or sliding:
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
