"""Resume: stop after step 6 of 12, resume from the step-6 checkpoint in a fresh trainer, and end where an
uninterrupted 12-step run with the same seed ends (adapter, optimizer, scheduler, RNG, data position all come
back). In-process; the Ray paths (`--resume RUN_ID`, automatic restarts) are in test_fault_tolerance.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from lorafleet.errors import LorafleetError
from tests.test_methods import single_thread, tiny_job, train_in_process  # noqa: F401 (autouse fixture)


class StopAfter(TrainerCallback):
    """Stands in for a crash right after a checkpoint: the run ends at `step`, as if the process died."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def resume_job(storage: Path):
    # dropout > 0 makes the result depend on the restored RNG state, not only on the weights
    return tiny_job(
        storage,
        name="resume",
        adapter={"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1},
        training={"max_steps": 12, "save_steps": 3, "lr_scheduler": "cosine", "warmup_steps": 2},
    )


def adapter_state(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def losses_by_step(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_stop_at_6_and_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    job = resume_job(tmp_path)
    straight, _ = train_in_process(job, tmp_path / "straight")
    straight.train()

    first, _ = train_in_process(job, tmp_path / "first", callbacks=(StopAfter(6),))
    first.train()
    assert first.state.global_step == 6
    checkpoint = tmp_path / "first" / "out" / "checkpoint-6"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name

    resumed, _ = train_in_process(job, tmp_path / "resumed")  # a fresh trainer, as a restarted worker builds
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 12

    expected, actual = losses_by_step(straight), losses_by_step(resumed)
    for step in range(7, 13):
        assert actual[step] == pytest.approx(expected[step], abs=1e-5), (step, actual, expected)
    final_straight, final_resumed = adapter_state(straight), adapter_state(resumed)
    assert final_straight.keys() == final_resumed.keys()
    for name, tensor in final_straight.items():
        torch.testing.assert_close(final_resumed[name], tensor, atol=1e-6, rtol=1e-5)


def test_an_incomplete_checkpoint_is_refused(tmp_path: Path) -> None:
    from lorafleet.training.worker import require_complete_checkpoint

    (tmp_path / "adapter_config.json").write_text("{}")  # the model was written, the trainer state was not
    with pytest.raises(LorafleetError, match="incomplete .*trainer_state.json"):
        require_complete_checkpoint(str(tmp_path))
    (tmp_path / "trainer_state.json").write_text("{}")
    require_complete_checkpoint(str(tmp_path))


def test_resume_reads_the_saved_config(tmp_path: Path) -> None:
    from lorafleet.runs import RunFolder
    from lorafleet.training.launcher import load_run_config

    job = tiny_job(tmp_path, distributed={"strategy": "deepspeed", "deepspeed": {"stage": 3, "offload_params": True}})
    RunFolder.of(str(tmp_path), "saved").write_config(job)
    assert load_run_config(str(tmp_path), "saved") == job
    with pytest.raises(LorafleetError, match="no run nope"):
        load_run_config(str(tmp_path), "nope")
