"""The LM head only at labelled positions: the same loss and gradients as the full computation, generation
untouched, and a training run whose losses match `training.logits: all` step by step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafleet.training.labelled_logits import IGNORE_INDEX, LabelledLogits


def lora_model(model_dir: str, target_modules="all-linear"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules, init_lora_weights=False)
    return get_peft_model(base, config)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded rows of different lengths, labels on each row's last few tokens (as an answer is)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 250, (2, 30), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 21:] = 0
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 24:] = input_ids[0, 24:]
    labels[1, 15:21] = input_ids[1, 15:21]
    return input_ids, attention_mask, labels


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, 40])
@pytest.mark.parametrize("target_modules", ["all-linear", ["q_proj", "v_proj", "lm_head"]])
def test_loss_and_gradients_equal_the_full_computation(tiny_model_dir: str, num_items, target_modules) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    input_ids, attention_mask, labels = batch()
    full = lora_model(tiny_model_dir, target_modules)
    outputs = full(input_ids=input_ids, attention_mask=attention_mask)
    reference = ForCausalLMLoss(outputs.logits, labels, full.config.vocab_size, num_items_in_batch=num_items)
    reference.backward()

    model = lora_model(tiny_model_dir, target_modules)
    labelled = LabelledLogits(model)
    with labelled.at(labels):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        assert outputs.logits.shape == (1, int((labels[:, 1:] != IGNORE_INDEX).sum()), model.config.vocab_size)
        loss = labelled.loss(outputs, labels, num_items)
    loss.backward()

    assert torch.allclose(loss, reference, atol=1e-6), (float(loss), float(reference))
    expected, got = gradients(full), gradients(model)
    assert expected.keys() == got.keys() and any("lm_head" in name for name in got) == ("lm_head" in target_modules)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-6, rtol=1e-4), name


def test_outside_a_batch_the_head_runs_everywhere(tiny_model_dir: str) -> None:
    model, reference = lora_model(tiny_model_dir), lora_model(tiny_model_dir)
    labelled = LabelledLogits(model)
    input_ids, attention_mask, labels = batch(1)
    with torch.no_grad():
        with labelled.at(labels):
            model(input_ids=input_ids, attention_mask=attention_mask)
        assert torch.equal(
            model(input_ids=input_ids, attention_mask=attention_mask).logits,
            reference(input_ids=input_ids, attention_mask=attention_mask).logits,
        )
        prompt = input_ids[:1, :8]
        assert torch.equal(
            model.generate(prompt, max_new_tokens=6, do_sample=False),
            reference.generate(prompt, max_new_tokens=6, do_sample=False),
        )
    with pytest.raises(RuntimeError, match="inside LabelledLogits.at"):
        labelled.loss({"logits": torch.zeros(1, 1, 4)}, labels)


@pytest.mark.parametrize("packing", [False, True])
def test_training_losses_match_the_full_head(tmp_path: Path, packing: bool) -> None:
    """Five optimizer steps with gradient accumulation: every logged loss and the final adapter agree."""
    from tests.test_methods import tiny_job, train_in_process

    runs = {}
    for logits in ("all", "labelled"):
        job = tiny_job(
            tmp_path / logits,
            data={"packing": packing},
            training={"logits": logits, "gradient_accumulation_steps": 2, "logging_steps": 1},
        )
        trainer, _ = train_in_process(job, tmp_path / logits)
        assert (trainer.labelled_logits is not None) is (logits == "labelled")
        trainer.train()
        losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[logits] = losses, weights
    (all_losses, all_weights), (labelled_losses, labelled_weights) = runs["all"], runs["labelled"]
    assert len(all_losses) == 5
    assert labelled_losses == pytest.approx(all_losses, rel=1e-4)
    for name, weight in all_weights.items():
        assert torch.allclose(labelled_weights[name], weight, atol=1e-5), name
