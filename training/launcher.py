"""Start a fine-tune on Ray Train and turn its final checkpoint into the run's adapter.

    lorafleet train configs/tiny.yaml                 # embedded Ray on this machine
    lorafleet train configs/tiny.yaml --address auto  # an already running cluster

The run folder on shared storage, `<storage>/runs/<run-id>/`:
    config.yaml        the resolved job config (the run's only input)
    checkpoints/       Ray Train's checkpoints (adapter + optimizer + scheduler + RNG + trainer state)
    metrics.jsonl      one record per log event (`train_begin` with `resumed: true` marks each restart)
    tensorboard/       event files (wandb/, mlruns/ when those sinks are listed)
    deepspeed.json     the DeepSpeed config the workers used (strategy: deepspeed)
    adapter/           the final adapter in PEFT format, plus the tokenizer
    run.json           summary: status, steps, losses, timings
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from lorafleet.config import JobConfig
from lorafleet.errors import LorafleetError
from lorafleet.storage import StorageRoot, is_valid_run_id, local_path_of, upload_dir, write_text_atomic

CHECKPOINT_ONLY_FILES = re.compile(
    r"^((optimizer|scheduler|rng_state.*|trainer_state|training_args|scaler)\.(pt|pth|json|bin)"
    r"|latest|zero_to_(fp32|torch)\.py)$"  # DeepSpeed's resume pointer and conversion scripts
)


class TrainingFailed(LorafleetError):
    pass


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    run_dir: str
    status: str
    global_step: int
    train_loss: float | None
    adapter_dir: str
    seconds: float
    config_hash: str


def new_run_id(job_name: str) -> str:
    return f"{job_name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def validate_run_id(run_id: str) -> str:
    if not is_valid_run_id(run_id):
        raise LorafleetError(f"run id {run_id!r} is invalid: use lowercase letters, digits, '.', '_' and '-'")
    return run_id


def run_training(job: JobConfig, *, run_id: str | None = None, address: str | None = None) -> RunSummary:
    """Train (or continue) run `run_id`: an existing run folder resumes from its last complete checkpoint."""
    run_id = validate_run_id(run_id or new_run_id(job.name))
    run_dir = StorageRoot(job.storage.uri).run_dir(run_id)
    previous = _read_run_file(run_dir, "config.yaml")
    if previous is not None and _parse_config(previous) != job:
        raise LorafleetError(
            f"run {run_id} exists with a different config; resume it with the config saved in "
            f"{run_dir}/config.yaml, or start a new run id"
        )
    preflight(job, embedded=address is None)
    _write_run_file(run_dir, "config.yaml", job.to_yaml())
    print(f"run {run_id}{' (resuming)' if previous else ''}\nfolder {run_dir}", flush=True)
    deepspeed = None
    if job.distributed.strategy == "deepspeed":
        from lorafleet.training.strategies import deepspeed_config

        deepspeed = deepspeed_config(job)
        _write_run_file(run_dir, "deepspeed.json", json.dumps(deepspeed, indent=2))

    started = time.monotonic()
    if address is None:
        provision_builtins(job)
    connect_ray(job, address)
    try:
        result = build_trainer(job, run_id, run_dir, deepspeed=deepspeed).fit()
        error = result.error if result.checkpoint is not None else result.error or "no checkpoint was reported"
    except Exception as exc:  # Ray Train V2 raises the workers' error from fit()
        error = exc
    if error is not None:
        failure = {"run_id": run_id, "status": "failed", "error": str(error)}
        _write_run_file(run_dir, "run.json", json.dumps(failure, indent=2))
        raise TrainingFailed(f"run {run_id} failed: {error}")

    final_checkpoint = result.checkpoint
    if job.training.best_metric:
        final_checkpoint = result.get_best_checkpoint(job.training.best_metric, job.training.best_metric_mode)
    adapter_dir = f"{run_dir}/adapter"
    export_adapter(final_checkpoint, adapter_dir, base_model=job.model.name_or_path)
    _plot_losses(run_dir)
    outcome = result.return_value or {}
    summary = RunSummary(
        run_id=run_id,
        run_dir=run_dir,
        status="succeeded",
        global_step=int(outcome.get("global_step") or result.metrics.get("step", 0)),
        train_loss=outcome.get("train_loss"),
        adapter_dir=adapter_dir,
        seconds=round(time.monotonic() - started, 1),
        config_hash=job.config_hash(),
    )
    _write_run_file(run_dir, "run.json", json.dumps(asdict(summary) | {"data": outcome.get("data")}, indent=2))
    return summary


def provision_builtins(job: JobConfig) -> None:
    """Make builtin models and datasets once on this machine, before workers (which share its cache) start.

    Inside a distributed job only rank 0 would write model weights, so the build must not happen there.
    """
    from lorafleet.demo_data import resolve_builtin_dataset
    from lorafleet.models import is_builtin, resolve_model

    if is_builtin(job.model.name_or_path):
        resolve_model(job.model.name_or_path)
    for reference in (job.data.train, job.data.eval):
        if reference and reference.startswith("builtin:"):
            resolve_builtin_dataset(reference)


def preflight(job: JobConfig, *, embedded: bool) -> None:
    """What can be checked before Ray starts: optional packages, and on an embedded Ray (the workers run on this
    machine) the device itself: GPUs present, precision, bitsandbytes. Workers check again on their device."""
    import torch

    from lorafleet.training.model import check_precision, check_quantization
    from lorafleet.training.sinks import check_sinks
    from lorafleet.training.strategies import check_strategy

    check_sinks(job.training.logging)
    check_strategy(job, "cuda" if job.distributed.use_gpu else "cpu")
    if not embedded:
        return
    if job.distributed.use_gpu and not torch.cuda.is_available():
        raise LorafleetError(
            "distributed.use_gpu: true but this machine has no CUDA GPU for the embedded Ray; "
            "pass --address of a GPU cluster, or set distributed.use_gpu: false"
        )
    device = torch.device("cuda", 0) if job.distributed.use_gpu else torch.device("cpu")
    check_precision(job.training.precision, device)
    if job.model.quantization != "none":
        check_quantization(job.model, device)


def connect_ray(job: JobConfig, address: str | None) -> None:
    """Join `address`, or start an embedded Ray sized so that the job's workers fit on this machine."""
    import ray

    # Worker prints reach the driver once, through Ray's log forwarding (not also through the logger patch).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    cpus_needed = job.distributed.num_workers * job.distributed.resources_per_worker.get("CPU", 1)
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)),
        include_dashboard=True,  # Ray Train's controller watches itself through the state API it serves
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level="warning",
    )


def build_trainer(job: JobConfig, run_id: str, run_dir: str, *, deepspeed: dict | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lorafleet.training.worker import train_loop_per_worker

    distributed = job.distributed
    resources = dict(distributed.resources_per_worker)
    if distributed.use_gpu:
        resources.setdefault("GPU", 1)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": job.to_yaml(), "run_id": run_id, "run_dir": run_dir, "deepspeed": deepspeed},
        torch_config=TorchConfig(backend="nccl" if distributed.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=distributed.num_workers, use_gpu=distributed.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=run_dir,
            failure_config=FailureConfig(max_failures=distributed.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.training.keep_checkpoints,
                checkpoint_score_attribute=job.training.best_metric,
                checkpoint_score_order=job.training.best_metric_mode,
            ),
        ),
    )


def export_adapter(checkpoint, adapter_uri: str, *, base_model: str) -> None:
    """Copy the adapter and tokenizer (not optimizer state) out of a checkpoint into the run's adapter/."""
    with checkpoint.as_directory() as source, tempfile.TemporaryDirectory() as staging:
        source_dir = Path(source)
        if not (source_dir / "adapter_config.json").is_file():
            raise TrainingFailed(f"checkpoint {checkpoint.path} holds no adapter_config.json")
        for item in source_dir.iterdir():
            if item.is_file() and not CHECKPOINT_ONLY_FILES.match(item.name):
                (Path(staging) / item.name).write_bytes(item.read_bytes())
        adapter_config_path = Path(staging) / "adapter_config.json"
        adapter_config = json.loads(adapter_config_path.read_text())
        adapter_config["base_model_name_or_path"] = base_model
        adapter_config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        upload_dir(Path(staging), adapter_uri)


def _plot_losses(run_dir: str) -> None:
    local = local_path_of(run_dir)
    if local is not None and (local / "metrics.jsonl").is_file():
        from lorafleet.training.plots import plot_loss_curves

        plot_loss_curves(local / "metrics.jsonl", local / "report" / "loss.png")


def _parse_config(text: str) -> JobConfig | None:
    """A saved config read with today's schema (new keys take their defaults); None if it no longer validates."""
    import yaml
    from pydantic import ValidationError

    try:
        return JobConfig.model_validate(yaml.safe_load(text))
    except ValidationError:
        return None


def load_run_config(storage_uri: str, run_id: str) -> JobConfig:
    """The config a run was started with (for `lorafleet train --resume RUN_ID`)."""
    import yaml

    run_dir = StorageRoot(storage_uri).run_dir(validate_run_id(run_id))
    text = _read_run_file(run_dir, "config.yaml")
    if text is None:
        raise LorafleetError(f"no run {run_id} under {storage_uri}/runs (no config.yaml)")
    return JobConfig.model_validate(yaml.safe_load(text))


def _read_run_file(run_dir: str, name: str) -> str | None:
    local = local_path_of(run_dir)
    if local is not None:
        path = local / name
        return path.read_text() if path.is_file() else None
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(f"{run_dir}/{name}")
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def _write_run_file(run_dir: str, name: str, text: str) -> None:
    local = local_path_of(run_dir)
    if local is not None:
        write_text_atomic(local / name, text)
        return
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(f"{run_dir}/{name}")
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())
