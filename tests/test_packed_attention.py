"""Per-example attention for packed batches: the same logits and gradients as transformers' block-diagonal mask,
everything else (padding masks, generation) untouched, and the worker turns it on only for packed CPU jobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafleet.training.packed_attention import NAME, example_lengths, use_packed_attention

# Two rows: three examples plus the collator's padding run; one example filling the row.
POSITIONS = torch.tensor([list(range(15)) + list(range(20)) + list(range(5)), list(range(40))])


def load(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture
def models(tiny_model_dir: str):
    reference, packed = load(tiny_model_dir), load(tiny_model_dir)
    assert use_packed_attention(packed) and packed.config._attn_implementation == NAME
    assert reference.config._attn_implementation == "sdpa"
    return reference, packed


def test_example_lengths_follow_the_position_restarts() -> None:
    assert example_lengths(POSITIONS[0]) == [15, 20, 5]
    assert example_lengths(POSITIONS[1]) == [40]


def test_packed_batch_gives_the_block_diagonal_logits_and_gradients(models) -> None:
    reference, packed = models
    input_ids = torch.randint(0, 250, POSITIONS.shape, generator=torch.Generator().manual_seed(0))
    outputs = [model(input_ids=input_ids, position_ids=POSITIONS, use_cache=False) for model in models]
    assert torch.allclose(outputs[0].logits, outputs[1].logits, atol=1e-5)
    for output in outputs:
        output.logits.square().mean().backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), packed.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_padding_masks_and_generation_are_unchanged(models) -> None:
    reference, packed = models
    input_ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 16:] = 0
    with torch.no_grad():
        for kwargs in ({"attention_mask": attention_mask}, {}):
            a = reference(input_ids=input_ids, use_cache=False, **kwargs).logits
            b = packed(input_ids=input_ids, use_cache=False, **kwargs).logits
            assert torch.equal(a, b)
    generated = [model.generate(input_ids[:1, :8], max_new_tokens=6, do_sample=False) for model in models]
    assert torch.equal(*generated)


def test_other_attention_implementations_are_left_alone(tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not use_packed_attention(eager) and eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("packing", [True, False])
def test_worker_uses_it_for_packed_cpu_jobs_only(tmp_path: Path, packing: bool) -> None:
    from tests.test_methods import tiny_job, train_in_process

    trainer, _ = train_in_process(tiny_job(tmp_path, data={"packing": packing}), tmp_path)
    assert (trainer.model.config._attn_implementation == NAME) is packing
