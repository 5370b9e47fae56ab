"""Training features on the tiny model, in-process (`build_hf_trainer`, no Ray): QLoRA / 8-bit on CPU, precision,
gradient checkpointing, accumulation, schedules, seeds, evaluation with perplexity, early stopping on a real
plateau, TensorBoard scalars, optional sinks, and the loss plot. Failures that must come before training are
checked through the CLI too (they return before Ray starts).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from lorafleet.errors import LorafleetError
from tests.helpers import CONFIGS, run_cli
from tests.test_methods import CPU, single_thread, tiny_job, train_in_process  # noqa: F401 (autouse fixture)


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


# ---- quantization (bitsandbytes) -------------------------------------------------------------------------

QUANTIZED = [
    ({"quantization": "4bit", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}, "Linear4bit"),
    ({"quantization": "4bit", "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}, "Linear4bit"),
    ({"quantization": "8bit"}, "Linear8bitLt"),
]


@pytest.mark.parametrize(("model", "layer"), QUANTIZED, ids=["nf4-double-quant", "fp4", "8bit"])
def test_quantized_base_trains_three_steps_on_cpu(tmp_path: Path, model: dict, layer: str) -> None:
    job = tiny_job(tmp_path, model=model, training={"max_steps": 3})
    trainer, _ = train_in_process(job, tmp_path)
    layers = {type(module).__name__ for module in trainer.model.modules()}
    assert layer in layers, f"the base was not quantized: {sorted(layers)}"
    before = lora_weights(trainer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    after = lora_weights(trainer)
    assert any(not torch.equal(before[name], after[name]) for name in before), "the adapter did not change"


def test_quantization_without_bitsandbytes_fails_before_loading(tmp_path: Path, monkeypatch) -> None:
    from lorafleet.training import model

    monkeypatch.setattr(model, "bitsandbytes_installed", lambda: False)
    job = tiny_job(tmp_path, model={"quantization": "4bit"})
    with pytest.raises(model.UnsupportedOnDevice, match=r"needs bitsandbytes: pip install"):
        train_in_process(job, tmp_path)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantization_on_a_device_bitsandbytes_cannot_run_on_is_refused(tmp_path: Path, mode: str) -> None:
    """The probe runs a real quantized layer on the device; `meta` stands in for any unsupported device."""
    from lorafleet.training.model import UnsupportedOnDevice, check_quantization

    job = tiny_job(tmp_path, model={"quantization": mode})
    with pytest.raises(UnsupportedOnDevice, match=rf"quantization: {mode} cannot run on meta with bitsandbytes"):
        check_quantization(job.model, torch.device("meta"))


# ---- precision --------------------------------------------------------------------------------------------


def test_fp16_on_a_cpu_worker_is_refused_before_loading(tmp_path: Path) -> None:
    from lorafleet.training.model import UnsupportedOnDevice

    # The config already refuses fp16 without use_gpu; a GPU job that lands on a CPU worker is caught here.
    job = tiny_job(tmp_path, training={"precision": "fp16"}, distributed={"use_gpu": True})
    with pytest.raises(UnsupportedOnDevice, match="fp16 needs a CUDA GPU"):
        train_in_process(job, tmp_path)


def test_gpu_job_on_a_machine_without_cuda_fails_before_ray_starts(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_cli(
        "train", str(CONFIGS / "tiny.yaml"), "--set", f"storage.uri={tmp_path}",
        "--set", "distributed.use_gpu=true", "--run-id", "no-gpu", timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no CUDA GPU" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "no-gpu" / "config.yaml").exists()
    assert time.monotonic() - started < 60  # no Ray was started


# ---- optimisation knobs -----------------------------------------------------------------------------------


def test_schedule_warmup_decay_clipping_and_accumulation_reach_the_trainer(tmp_path: Path) -> None:
    from lorafleet.training.worker import training_arguments

    job = tiny_job(
        tmp_path,
        training={
            "max_steps": 6, "lr_scheduler": "cosine", "warmup_steps": 2, "weight_decay": 0.01,
            "max_grad_norm": 0.5, "gradient_accumulation_steps": 2, "seed": 7,
        },
    )  # fmt: skip
    args = training_arguments(job, str(tmp_path / "out"), has_eval=False)
    assert (args.lr_scheduler_type, args.warmup_steps, args.weight_decay) == ("cosine", 2, 0.01)
    assert (args.max_grad_norm, args.gradient_accumulation_steps, args.seed) == (0.5, 2, 7)
    ratio = training_arguments(tiny_job(tmp_path, training={"warmup_ratio": 0.25}), str(tmp_path), has_eval=False)
    assert ratio.warmup_steps == 0.25 and ratio.get_warmup_steps(8) == 2

    trainer, _ = train_in_process(job, tmp_path)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    rates = [entry["learning_rate"] for entry in logged]
    peak = job.training.learning_rate
    assert rates[:3] == pytest.approx([0.0, peak / 2, peak]), rates  # linear warmup over 2 steps (rate used per step)
    assert rates[2:] == sorted(rates[2:], reverse=True) and rates[-1] < peak / 2, rates  # then cosine decay
    assert all("grad_norm" in entry for entry in logged)
    assert trainer.state.num_input_tokens_seen > 0


def test_accumulation_matches_a_larger_micro_batch(tmp_path: Path) -> None:
    """2 x 2 accumulated micro-batches give the step a 4-example batch gives (token-weighted loss)."""

    def first_step(micro_batch: int, accumulation: int) -> tuple[float, dict]:
        job = tiny_job(
            tmp_path / f"{micro_batch}x{accumulation}",
            training={"max_steps": 1, "micro_batch_size": micro_batch, "gradient_accumulation_steps": accumulation},
        )
        trainer, _ = train_in_process(job, tmp_path / f"{micro_batch}x{accumulation}")
        trainer.train()
        return trainer.state.log_history[0]["loss"], lora_weights(trainer)

    loss_accumulated, accumulated = first_step(2, 2)
    loss_batched, batched = first_step(4, 1)
    assert loss_accumulated == pytest.approx(loss_batched, abs=1e-4)
    for name, tensor in batched.items():
        torch.testing.assert_close(accumulated[name], tensor, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_changes_memory_not_math_and_the_seed_decides(tmp_path: Path) -> None:
    def run(name: str, **model) -> tuple[list[float], dict, object]:
        job = tiny_job(tmp_path / name, model=model, training={"max_steps": 3, "seed": 7 if "seed" in name else 42})
        trainer, _ = train_in_process(job, tmp_path / name)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, lora_weights(trainer), trainer.model

    plain_losses, plain, _ = run("plain")
    checkpointed_losses, checkpointed, model = run("checkpointed", gradient_checkpointing=True)
    assert model.base_model.model.is_gradient_checkpointing
    assert checkpointed_losses == pytest.approx(plain_losses, abs=1e-5)
    for name, tensor in plain.items():
        torch.testing.assert_close(checkpointed[name], tensor, atol=1e-5, rtol=1e-4)
    again_losses, again, _ = run("plain-again")
    assert again_losses == plain_losses and all(torch.equal(again[name], plain[name]) for name in plain)
    _, other_seed, _ = run("other-seed")
    assert any(not torch.equal(other_seed[name], plain[name]) for name in plain)


# ---- evaluation, early stopping, TensorBoard, plot: one real run that plateaus -------------------------------


@pytest.fixture(scope="module")
def plateau_run(tmp_path_factory: pytest.TempPathFactory):
    """lr 0.1 on the tiny model: eval loss falls for ~18 steps, then stalls; patience 3 stops the run."""
    workdir = tmp_path_factory.mktemp("plateau")
    job = tiny_job(
        workdir,
        name="plateau",
        data={"max_rows": 64, "val_split": 0.25},
        training={
            "max_steps": 60, "learning_rate": 0.1, "eval_steps": 2, "logging": ["tensorboard"],
            "early_stopping": {"patience": 3, "metric": "eval_loss", "mode": "min"},
        },
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer, _ = train_in_process(job, workdir)
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    return job, trainer, workdir / "run"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_early_stopping_stops_when_eval_loss_stops_improving(plateau_run) -> None:
    job, trainer, run_dir = plateau_run
    records = read_metrics(run_dir)
    end = [record for record in records if record.get("event") == "train_end"][-1]
    assert end["stopped_early"] and end["step"] < job.training.max_steps, end
    evals = [record["eval_loss"] for record in records if "eval_loss" in record]
    patience = job.training.early_stopping.patience
    best_before = min(evals[:-patience])
    assert all(value >= best_before for value in evals[-patience:]), evals  # the last `patience` did not improve
    assert evals[-patience - 1] == best_before or min(evals) == best_before
    assert any(entry.get("early_stopped_at") == end["step"] for entry in trainer.state.log_history)


def test_every_evaluation_reports_loss_and_perplexity(plateau_run) -> None:
    job, _, run_dir = plateau_run
    evaluations = [record for record in read_metrics(run_dir) if "eval_loss" in record]
    assert [record["step"] for record in evaluations] == list(range(2, 2 * len(evaluations) + 1, 2))
    for record in evaluations:
        assert record["eval_perplexity"] == pytest.approx(math.exp(record["eval_loss"]), rel=1e-9)


def test_tensorboard_has_train_and_eval_scalars(plateau_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, trainer, run_dir = plateau_run
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    scalars: dict[str, list] = {}
    for file in files:
        accumulator = EventAccumulator(str(file), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(accumulator.Scalars(tag))
    for tag in ("train/loss", "train/learning_rate", "eval/loss", "eval/perplexity"):
        assert tag in scalars, sorted(scalars)
    assert len(scalars["train/loss"]) == trainer.state.global_step
    assert scalars["eval/loss"][0].step == 2


def test_loss_plot_shows_train_and_eval(plateau_run) -> None:
    from lorafleet.runs import RunFolder
    from lorafleet.training.launcher import plot_losses

    _, _, run_dir = plateau_run
    plot_losses(RunFolder(str(run_dir)))
    png = run_dir / "report" / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_plot_keeps_the_resumed_values_and_marks_restarts(tmp_path: Path) -> None:
    from lorafleet.training.plots import latest_per_step, plot_loss_curves, restarts

    records = [
        {"event": "train_begin", "step": 0, "resumed": False},
        *({"step": step, "loss": 5.0 - step / 10} for step in range(1, 6)),
        {"event": "train_begin", "step": 3, "resumed": True},
        *({"step": step, "loss": 4.0 - step / 10} for step in range(4, 8)),
        {"step": 4, "eval_loss": 4.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert latest_per_step(records, "loss") == [(1, 4.9), (2, 4.8), (3, 4.7), (4, 3.6), (5, 3.5), (6, 3.4), (7, 3.3)]
    assert restarts(records) == [3]
    assert plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "loss.png").is_file()


# ---- optional metric sinks ------------------------------------------------------------------------------


@pytest.mark.parametrize("sink", ["wandb", "mlflow"])
def test_a_missing_sink_package_fails_before_training(tmp_path: Path, monkeypatch, sink: str) -> None:
    from lorafleet.training import sinks

    monkeypatch.setattr(sinks, "is_installed", lambda module: False)
    job = tiny_job(tmp_path, training={"logging": ["tensorboard", sink]})
    with pytest.raises(LorafleetError, match=rf"training.logging lists {sink} .* pip install {sink}"):
        train_in_process(job, tmp_path)


def test_cli_names_the_package_to_install_before_ray_starts(tmp_path: Path) -> None:
    # A sitecustomize that hides wandb from this one interpreter (find_spec returns None for a None entry).
    hide = tmp_path / "hide-wandb"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    result = run_cli(
        "train", str(CONFIGS / "tiny.yaml"), "--set", f"storage.uri={tmp_path}",
        "--set", "training.logging=[tensorboard, wandb]", "--run-id", "no-wandb", timeout=120,
        env={"PYTHONPATH": str(hide)},
    )  # fmt: skip
    assert result.returncode != 0
    assert "pip install wandb" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "runs" / "no-wandb").exists()


@pytest.mark.parametrize(("sink", "folder"), [("wandb", "wandb"), ("mlflow", "mlruns")])
def test_an_installed_sink_writes_into_the_run_folder_offline(tmp_path: Path, monkeypatch, sink: str, folder: str):
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(name, "")  # recorded, so what the sink sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_SILENT", "true")
    job = tiny_job(tmp_path, training={"max_steps": 2, "logging": [sink]})
    trainer, _ = train_in_process(job, tmp_path)
    trainer.train()
    assert any((tmp_path / "run" / folder).rglob("*")), f"nothing under run/{folder}"
