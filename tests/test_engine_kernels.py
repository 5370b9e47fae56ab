"""The CPU engine's building blocks for speed: packed linear weights never read stale, and the growing KV cache
keeps every view it handed out (what a failed step's restore relies on)."""

from __future__ import annotations

import copy

import torch

from lorafleet.serving.kv_cache import SPARE_MIN, GrowingCache, cache_tensors
from lorafleet.serving.packed_linear import PackedLinear, can_pack, pack_linears


def test_the_pinned_torch_packs_for_onednn() -> None:
    """The pinned CPU torch has oneDNN; without it every test here would measure `F.linear` instead."""
    assert can_pack(torch.float32)


def test_packed_linear_equals_the_dense_one_and_never_reads_a_stale_copy() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32, bias=False))
    x = torch.randn(5, 3, 64)
    with torch.inference_mode():
        dense = model(x)
    assert pack_linears(model) == 2 and all(type(m) is PackedLinear for m in (model[0], model[2]))
    with torch.inference_mode():
        assert (model(x) - dense).abs().max().item() < 1e-5
    copied = copy.deepcopy(model)  # what PEFT's modules_to_save does: the copy has its own weights
    with torch.no_grad():
        model[2].weight.mul_(2)  # an in-place change of the dense weight
        copied[2].weight.mul_(3)
    with torch.inference_mode():
        assert (model(x) - 2 * dense).abs().max().item() < 1e-4
        assert (copied(x) - 3 * dense).abs().max().item() < 1e-4
    model[2].weight = torch.nn.Parameter(torch.zeros(32, 96))  # a new weight altogether
    with torch.inference_mode():
        assert model(x).abs().max().item() == 0.0


def test_packed_linear_keeps_gradients_when_they_are_asked_for() -> None:
    layer = torch.nn.Linear(8, 4)
    pack_linears(layer)
    x = torch.randn(2, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_growing_cache_writes_in_place_and_keeps_earlier_views() -> None:
    cache = GrowingCache()
    first = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    cache.update(*first, layer_idx=0)
    ((keys, values),) = cache_tensors(cache)
    snapshot = keys.clone(), values.clone()
    buffer = keys.untyped_storage().data_ptr()
    for step in range(40):  # decode steps: one column each
        new = torch.full((2, 3, 1, 4), float(step)), torch.full((2, 3, 1, 4), -float(step))
        all_keys, all_values = cache.update(*new, layer_idx=0)
        assert all_keys.shape[2] == 6 + step and torch.equal(all_keys[:, :, -1:], new[0])
        assert torch.equal(all_values[:, :, :5], first[1])
    assert SPARE_MIN < 40
    assert torch.equal(keys, snapshot[0]) and torch.equal(values, snapshot[1]), "a view handed out never changes"
    assert cache.get_seq_length() == 45
    grown = cache_tensors(cache)[0][0].untyped_storage().data_ptr()
    assert grown != buffer, "40 more columns than the first buffer has spare: it was reallocated"
    refilled = GrowingCache([(keys, values)])  # a restore: a new cache from the snapshot's views
    assert torch.equal(cache_tensors(refilled)[0][0], snapshot[0])


def test_prefix_cache_keeps_within_its_limit_and_drops_chain_tails_first() -> None:
    from lorafleet.serving.prefix_cache import PrefixCache

    def kv(tokens: list[int]):
        column = torch.tensor(tokens, dtype=torch.float32)[None, :, None].expand(2, -1, 4)  # [kv_heads, n, dim]
        return lambda: [(column, -column)]

    block_bytes = 2 * (2 * 4 * 4) * 4  # keys + values, 2 heads x 4 tokens x 4 dims, float32
    cache = PrefixCache(limit_bytes=5 * block_bytes, block_tokens=4)
    prompt = list(range(1, 14))  # 3 full blocks and a token
    cache.store("lf1", prompt, kv(prompt))
    assert cache.stats.blocks == 3 and cache.stats.bytes == 3 * block_bytes
    length, layers = cache.lookup("lf1", prompt[:9] + [99])
    assert length == 8 and torch.equal(layers[0][0][0, :, 0], torch.tensor(prompt[:8], dtype=torch.float32))
    assert cache.lookup("lf1", prompt[:8])[0] == 4, "the last prompt token is always left to compute"
    assert cache.lookup("lf2", prompt)[0] == 0, "another owner's chain starts elsewhere"
    other = [50 + t for t in prompt]
    cache.store("lf2", other, kv(other))  # 3 more blocks: one over the limit
    assert cache.stats.bytes <= 5 * block_bytes and cache.stats.blocks == 5
    assert cache.lookup("lf1", prompt)[0] == 8, "the older chain lost its tail, not its head"
    assert cache.lookup("lf2", other)[0] == 12
