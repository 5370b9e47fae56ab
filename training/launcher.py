"""Start a fine-tune on Ray Train and turn its final checkpoint into the run's adapter.

    lorafleet train configs/tiny.yaml                 # embedded Ray on this machine
    lorafleet train configs/tiny.yaml --address auto  # an already running cluster

The run folder's layout and its record (run.json) belong to `lorafleet.runs`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lorafleet.config import JobConfig
from lorafleet.errors import ConfigError, LorafleetError, Problem
from lorafleet.object_store import check_writable, is_s3_uri
from lorafleet.registry.checks import check_finite_weights
from lorafleet.registry.layout import RegistryError
from lorafleet.runs import (
    CHECKPOINTS_DIR,
    DEEPSPEED_FILE,
    METRICS_FILE,
    DataRecord,
    RunFolder,
    RunRecord,
    SweepTrial,
    new_run_id,
    validate_run_id,
)
from lorafleet.storage import upload_dir
from lorafleet.training.console import RunConsole
from lorafleet.training.ray_watchdog import start_watchdog, watch_session
from lorafleet.training.run_signals import RunStopped, fit_interruptibly, stop_on_signals
from lorafleet.training.worker_errors import failure_summary, lorafleet_cause

CHECKPOINT_ONLY_FILES = re.compile(
    r"^((optimizer|scheduler|rng_state.*|trainer_state|training_args|scaler)\.(pt|pth|json|bin)"
    r"|latest|zero_to_(fp32|torch)\.py)$"  # DeepSpeed's resume pointer and conversion scripts
)


RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of committed checkpoints


class TrainingFailed(LorafleetError):
    pass


def run_training(
    job: JobConfig, *, run_id: str | None = None, address: str | None = None, verbose: bool = False
) -> RunRecord:
    """Train (or continue) run `run_id`: an existing run folder resumes from its last complete checkpoint.

    The console shows lorafleet's lines; Ray's and the libraries' go to the run's log (all of it with `verbose`).
    """
    folder, resuming = open_run_folder(job, run_id or new_run_id(job.name))
    console = RunConsole(folder, verbose=verbose)
    console.start()
    try:
        with stop_on_signals() as rearm:
            return _train(job, folder, resuming, address=address, console=console, after_ray_init=rearm)
    except RunStopped as stop:
        stop.run_id = folder.run_id
        if folder.config_text() is not None:  # it had started: resumable from its last checkpoint
            folder.write_record(RunRecord(run_id=folder.run_id, status="stopped", error=str(stop), run_dir=folder.uri))
        raise
    except Exception as exc:  # once its config is written, a run folder always says how the run ended
        record = folder.read_record() if folder.config_text() is not None else None
        if folder.config_text() is not None and (record is None or record.status != "failed"):
            folder.write_record(RunRecord(run_id=folder.run_id, status="failed", error=str(exc), run_dir=folder.uri))
        raise
    finally:
        console.stop()


def run_trial(job: JobConfig, run_id: str, *, callbacks: list, sweep: SweepTrial) -> RunRecord:
    """One trial of a sweep, inside its Ray Tune trial: the same run as `run_training`, on the Ray already up;
    `callbacks` (Ray Train's) hand each report to Tune. Its output goes where the sweep's driver sends it."""
    folder, resuming = open_run_folder(job, run_id)
    return _train(job, folder, resuming, address="auto", console=None, callbacks=callbacks, sweep=sweep)


def open_run_folder(job: JobConfig, run_id: str) -> tuple[RunFolder, bool]:
    """The run's folder, and whether the run resumes (its folder holds the same config)."""
    if is_s3_uri(job.storage.uri):  # endpoint, credentials, bucket, write permission: before anything else
        check_writable(job.storage.uri)
    folder = RunFolder.of(job.storage.uri, validate_run_id(run_id))
    previous = folder.read_config() if folder.config_text() is not None else None
    if previous is not None and previous != job:
        raise LorafleetError(
            f"run {run_id} exists with a different config; resume it with the config saved in "
            f"{folder}/config.yaml, or start a new run id"
        )
    return folder, previous is not None


def _train(
    job: JobConfig,
    folder: RunFolder,
    resuming: bool,
    *,
    address: str | None,
    console: RunConsole | None,
    callbacks: list | tuple = (),
    sweep: SweepTrial | None = None,
    after_ray_init: Callable[[], None] | None = None,
) -> RunRecord:
    run_id = folder.run_id
    preflight(job, embedded=address is None)
    if console is not None:
        print(f"run {run_id}{' (resuming)' if resuming else ''}\nfolder {folder}\nlog {console.log_path}", flush=True)
    deepspeed = prepare_run_folder(job, folder, resuming)
    started = time.monotonic()
    if address is None:
        provision_builtins(job)
    connect_ray(job, address, quiet=console is None or not console.verbose)
    if after_ray_init is not None:
        after_ray_init()
    if console is not None:
        console.follow_workers()
    trainer = build_torch_trainer(job, folder, deepspeed=deepspeed, callbacks=callbacks)
    result = _fit(trainer, folder, console, sweep, interruptible=after_ray_init is not None)
    final_checkpoint = result.checkpoint
    if job.training.best_metric:
        final_checkpoint = result.get_best_checkpoint(job.training.best_metric, job.training.best_metric_mode)
    try:
        copy_adapter_out_of_checkpoint(final_checkpoint, folder.adapter_uri, base_model=job.model.name_or_path)
    except LorafleetError as exc:
        folder.write_record(RunRecord(run_id=run_id, status="failed", error=str(exc), run_dir=folder.uri, sweep=sweep))
        raise
    plot_losses(folder)
    outcome = result.return_value or {}
    record = RunRecord(
        run_id=run_id,
        status="succeeded",
        run_dir=folder.uri,
        global_step=int(outcome.get("global_step") or result.metrics.get("step", 0)),
        train_loss=outcome.get("train_loss"),
        adapter_dir=folder.adapter_uri,
        seconds=round(time.monotonic() - started, 1),
        config_hash=job.config_hash(),
        data=DataRecord.model_validate(outcome["data"]) if outcome.get("data") else None,
        sweep=sweep,
    )
    folder.write_record(record)
    return record


def _fit(trainer, folder: RunFolder, console: RunConsole | None, sweep: SweepTrial | None, *, interruptible: bool):
    """Ray Train's result; a failure is written to run.json and raised as the worker's own error when it is ours."""
    try:
        result = fit_interruptibly(trainer) if interruptible else trainer.fit()
        error = result.error if result.checkpoint is not None else result.error or "no checkpoint was reported"
    except RunStopped:
        raise
    except Exception as exc:  # Ray Train V2 raises the workers' error from fit()
        error = exc
    if error is None:
        return result
    ours = lorafleet_cause(error)  # a bad row or setting seen by a worker: the same message as on the driver
    folder.write_record(
        RunRecord(run_id=folder.run_id, status="failed", error=str(ours or error), run_dir=folder.uri, sweep=sweep)
    )
    if ours is not None:
        raise ours
    log = f"\n(the workers' full output: {console.log_path})" if console is not None else ""
    raise TrainingFailed(f"run {folder.run_id} failed:\n{failure_summary(error)}{log}")


def prepare_run_folder(job: JobConfig, folder: RunFolder, resuming: bool) -> dict | None:
    """Write the config (and the DeepSpeed config, returned) and drop checkpoints a killed run left half-written."""
    folder.write_config(job)
    deepspeed = None
    if job.distributed.strategy == "deepspeed":
        from lorafleet.training.strategies import deepspeed_config

        deepspeed = deepspeed_config(job)
        folder.write_text(DEEPSPEED_FILE, json.dumps(deepspeed, indent=2))
    if resuming and folder.local is not None:
        for name in prune_uncommitted_checkpoints(folder.local / CHECKPOINTS_DIR):
            print(f"[{folder.run_id}] removed {name}: a checkpoint the killed run never committed", flush=True)
    return deepspeed


def prune_uncommitted_checkpoints(checkpoints: Path) -> list[str]:
    """Remove checkpoint folders that Ray's checkpoint manager never recorded (a run killed while saving).

    Ray writes a checkpoint's folder first and lists it in `checkpoint_manager_snapshot.json` once it is whole;
    a folder missing from the list was never resumable and would otherwise stay forever.
    """
    if not checkpoints.is_dir():
        return []
    try:
        snapshot = json.loads((checkpoints / RAY_CHECKPOINT_SNAPSHOT).read_text())
        committed = {entry["checkpoint_dir_name"] for entry in snapshot.get("checkpoint_results", [])}
    except FileNotFoundError:
        committed = set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # unreadable: Ray will say so on restore; never delete what might be committed
    removed = []
    for entry in sorted(checkpoints.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and entry.name.startswith("checkpoint_"):
            if entry.name not in committed:
                shutil.rmtree(entry)
                removed.append(entry.name)
    return removed


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

    from lorafleet.training.data import check_rows_here
    from lorafleet.training.model import check_precision, check_quantization
    from lorafleet.training.sinks import check_sinks
    from lorafleet.training.strategies import check_strategy

    check_sinks(job.training.logging)
    check_strategy(job, "cuda" if job.distributed.use_gpu else "cpu")
    check_rows_here(job.data)
    if not embedded:
        return
    embedded_cpus(job)
    if job.distributed.use_gpu and not torch.cuda.is_available():
        raise LorafleetError(
            "distributed.use_gpu: true but this machine has no CUDA GPU for the embedded Ray; "
            "pass --address of a GPU cluster, or set distributed.use_gpu: false"
        )
    device = torch.device("cuda", 0) if job.distributed.use_gpu else torch.device("cpu")
    check_precision(job.training.precision, device)
    if job.model.quantization != "none":
        check_quantization(job.model, device)


def embedded_cpus(job: JobConfig, cpus_needed: float | None = None) -> int:
    """The CPUs an embedded Ray promises so that the job's workers (or `cpus_needed`) fit: at least this machine's
    cores, at most 4 per core (a few workers per core still run, slowly; thousands would only hang)."""
    if cpus_needed is None:
        cpus_needed = job.distributed.num_workers * job.distributed.resources_per_worker.get("CPU", 1)
    cores = os.cpu_count() or 1
    limit = max(8, 4 * cores)
    if cpus_needed > limit:
        raise ConfigError(
            "distributed",
            [
                Problem(
                    "distributed.num_workers",
                    f"{job.distributed.num_workers} workers x resources_per_worker.CPU ask for {cpus_needed:g} CPUs; "
                    f"the embedded Ray of this machine ({cores} cores) runs at most {limit}: lower num_workers or "
                    "resources_per_worker.CPU, or pass --address to run on a Ray cluster",
                )
            ],
        )
    return max(cores, math.ceil(cpus_needed))


def connect_ray(job: JobConfig, address: str | None, *, quiet: bool = False, cpus_needed: float | None = None) -> None:
    """Join `address`, or start an embedded Ray sized so that the job's workers (or `cpus_needed`) fit here."""
    import ray

    # Worker prints reach the driver once, through Ray's log forwarding (not also through the logger patch).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True, configure_logging=not quiet)
        return
    num_cpus = embedded_cpus(job, cpus_needed)
    watchdog = start_watchdog()  # kills what ray.init starts if this process dies, even by SIGKILL
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,  # Ray Train's controller watches itself through the state API it serves
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=not quiet,  # quiet: Ray's loggers keep the run log's handler
        logging_level="warning",
    )
    watch_session(watchdog, ray._private.worker._global_node.get_session_dir_path())  # private, pinned Ray


def build_torch_trainer(
    job: JobConfig, folder: RunFolder, *, deepspeed: dict | None = None, callbacks: list | tuple = ()
):
    """Ray Train's TorchTrainer for the job: one `train_loop_per_worker` per worker, checkpoints in the run;
    `callbacks` are Ray Train's (a sweep's trial passes the one that reports to Ray Tune)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lorafleet.training.worker import train_loop_per_worker

    distributed = job.distributed
    resources = dict(distributed.resources_per_worker)
    if distributed.use_gpu:
        resources.setdefault("GPU", 1)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": job.to_yaml(),
            "run_id": folder.run_id,
            "run_dir": folder.uri,
            "deepspeed": deepspeed,
        },
        torch_config=TorchConfig(backend="nccl" if distributed.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=distributed.num_workers,
            use_gpu=distributed.use_gpu,
            resources_per_worker=resources,
            placement_strategy=distributed.placement_strategy,
        ),
        run_config=RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=folder.uri,
            callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=distributed.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.training.keep_checkpoints,
                checkpoint_score_attribute=job.training.best_metric,
                checkpoint_score_order=job.training.best_metric_mode,
            ),
        ),
    )


def copy_adapter_out_of_checkpoint(checkpoint, adapter_uri: str, *, base_model: str) -> None:
    """Copy the adapter and tokenizer (not optimizer state) out of a checkpoint into the run's adapter/; weights
    holding NaN or infinities (a diverged run) are never copied."""
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
        weights = Path(staging) / "adapter_model.safetensors"
        if weights.is_file():
            from lorafleet.training.divergence import TrainingDiverged  # imports transformers: not at startup

            try:
                check_finite_weights(weights)
            except RegistryError as exc:
                raise TrainingDiverged(f"the final checkpoint's adapter is not usable: {exc}") from None
        upload_dir(Path(staging), adapter_uri)


def plot_losses(folder: RunFolder) -> None:
    local = folder.local
    if local is not None and (local / METRICS_FILE).is_file():
        from lorafleet.training.plots import plot_loss_curves

        plot_loss_curves(local / METRICS_FILE, local / "report" / "loss.png")


def load_run_config(storage_uri: str, run_id: str) -> JobConfig:
    """The config a run was started with (for `lorafleet train --resume RUN_ID`)."""
    folder = RunFolder.of(storage_uri, run_id)
    job = folder.read_config()
    if job is None:
        raise LorafleetError(f"no run {run_id} under {storage_uri}/runs (no config.yaml)")
    return job
