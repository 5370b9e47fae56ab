"""Metric sinks besides metrics.jsonl (`training.logging`): TensorBoard, Weights & Biases, MLflow.

All three are written by rank 0 only, through the HF Trainer's own integrations:
- tensorboard: event files under `<run>/tensorboard/` (always installed; the default).
- wandb: offline unless `WANDB_API_KEY` or `WANDB_MODE` say otherwise; files under `<run>/wandb/`
  (sync later with `wandb sync <run>/wandb/offline-run-*`). Project: `WANDB_PROJECT`, else the job name.
- mlflow: `MLFLOW_TRACKING_URI`, else a file store at `<run>/mlruns`. Experiment: `MLFLOW_EXPERIMENT_NAME`,
  else the job name.
wandb and mlflow are optional packages: a job that lists one that is not installed fails before training.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lorafleet.config import JobConfig
from lorafleet.errors import LorafleetError
from lorafleet.storage import local_path_of

OPTIONAL_SINKS = {"wandb": "wandb", "mlflow": "mlflow-skinny"}  # sink -> package to install


class SinkUnavailable(LorafleetError):
    pass


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_sinks(sinks: list[str]) -> None:
    missing = [sink for sink in sinks if sink in OPTIONAL_SINKS and not is_installed(sink)]
    if missing:
        packages = " ".join(OPTIONAL_SINKS[sink] for sink in missing)
        raise SinkUnavailable(
            f"training.logging lists {', '.join(missing)} but the package is not installed: "
            f"pip install {packages} (or remove {', '.join(missing)} from lorafleet.training.logging)"
        )


def sink_callbacks(job: JobConfig, run_dir: str, rank: int) -> list:
    """The HF callbacks for the job's sinks (rank 0; none elsewhere)."""
    if rank != 0:
        return []
    check_sinks(job.training.logging)
    local_run_dir = local_path_of(run_dir)
    callbacks = []
    if "tensorboard" in job.training.logging and local_run_dir is not None:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        writer = SummaryWriter(log_dir=str(Path(local_run_dir) / "tensorboard"))
        callbacks.append(TensorBoardCallback(tb_writer=writer))
    if "wandb" in job.training.logging:
        from transformers.integrations import WandbCallback

        if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_PROJECT", job.name)
        if local_run_dir is not None:
            os.environ.setdefault("WANDB_DIR", str(local_run_dir))
        callbacks.append(WandbCallback())
    if "mlflow" in job.training.logging:
        from transformers.integrations import MLflowCallback

        if "MLFLOW_TRACKING_URI" not in os.environ and local_run_dir is not None:
            os.environ["MLFLOW_TRACKING_URI"] = (Path(local_run_dir) / "mlruns").as_uri()
            # MLflow 3 refuses the file store unless asked; a plain folder is what travels with the run.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", job.name)
        callbacks.append(MLflowCallback())
    return callbacks
