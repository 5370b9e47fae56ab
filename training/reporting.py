"""What a training worker tells the world: metrics.jsonl, a console progress line, Ray Train checkpoints.

Ray Train needs every worker to call `ray.train.report` the same number of times, so all ranks report at
each save, each with the checkpoint files it wrote; Ray merges them into one checkpoint folder.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

from transformers import TrainerCallback

from lorafleet.runs import METRICS_FILE
from lorafleet.storage import StorageFolder, local_path_of

CHECKPOINT_PREFIX = "checkpoint-"


class MetricsLog:
    """Append-only JSONL of metrics in the run folder. On an object store each append reads the small object and
    writes it back whole (one PUT): a restarted worker group, or a second writer in the process, keeps every line."""

    def __init__(self, run_dir_uri: str):
        self.folder = StorageFolder(run_dir_uri)
        self.local = local_path_of(f"{self.folder.uri}/{METRICS_FILE}")

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True)
        if self.local is not None:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            with open(self.local, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
            return
        self.folder.write_text(METRICS_FILE, (self.folder.read_text(METRICS_FILE) or "") + line + "\n")


class ProgressReporter(TrainerCallback):
    """Rank 0: one metrics record and one console line per log event (step, loss, lr, tokens/s, ETA)."""

    def __init__(self, metrics: MetricsLog, run_id: str, workers: list[dict] | None = None, precision=None):
        self.metrics = metrics
        self.run_id = run_id
        self.workers = workers  # where each rank runs (rank, node_ip, node_id, hostname), recorded at every begin
        self.precision = precision  # lorafleet.precision.Precision: what `auto` resolved to, and why
        self._last_time = time.monotonic()
        self._last_tokens = 0
        self._start_time = self._last_time

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = self._start_time = time.monotonic()
        self._last_tokens = state.num_input_tokens_seen
        if state.is_world_process_zero:  # step > 0: resumed from a checkpoint (a restart or --resume)
            self.metrics.append(
                {
                    "event": "train_begin",
                    "step": state.global_step,
                    "max_steps": state.max_steps,
                    "resumed": state.global_step > 0,
                    "time": time.time(),
                    **({"workers": self.workers} if self.workers else {}),
                    **({"precision": asdict(self.precision)} if self.precision else {}),
                }
            )

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.metrics.append(
                {
                    "event": "train_end",
                    "step": state.global_step,
                    "max_steps": state.max_steps,
                    "stopped_early": state.global_step < state.max_steps,
                    "time": time.time(),
                }
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        now = time.monotonic()
        tokens = state.num_input_tokens_seen
        tokens_per_second = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_tokens = now, tokens
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        if "loss" in logs:
            record["tokens_per_second"] = tokens_per_second
        self.metrics.append(record)
        print(self._console_line(state, logs, tokens_per_second), flush=True)

    def _console_line(self, state, logs: dict, tokens_per_second: float) -> str:
        parts = [f"[{self.run_id}] step {state.global_step}/{state.max_steps}"]
        if "loss" in logs:
            parts += [
                f"loss {logs['loss']:.4f}",
                f"lr {logs.get('learning_rate', 0):.2e}",
                f"{tokens_per_second:,.0f} tok/s",
            ]
        if "eval_loss" in logs:
            parts.append(f"eval_loss {logs['eval_loss']:.4f}")
        if "eval_perplexity" in logs:
            parts.append(f"eval_ppl {logs['eval_perplexity']:.2f}")
        elapsed = time.monotonic() - self._start_time
        done = max(state.global_step, 1)
        remaining = elapsed / done * max(state.max_steps - state.global_step, 0)
        parts.append(f"eta {timedelta(seconds=int(remaining))}")
        return " | ".join(parts)


class RayCheckpointReporter(TrainerCallback):
    """At every HF save, every rank reports its checkpoint folder to Ray Train, which merges them into one;
    at an evaluation not followed by a save, every rank reports the metrics alone (a sweep's scheduler reads
    them through Ray Train's callbacks).

    Rank 0's folder holds the adapter, optimizer, scheduler and trainer state (with the data position); the
    others hold their own RNG state and, with DeepSpeed, their optimizer shards. Ray uploads synchronously, so
    the local copy is deleted afterwards (scratch disk stays at one checkpoint per worker).
    """

    def on_evaluate(self, args, state, control, **kwargs):
        import ray.train

        if not control.should_save:  # the save of this step reports these metrics with its checkpoint
            ray.train.report(latest_metrics(state))

    def on_save(self, args, state, control, **kwargs):
        import ray.train

        metrics = latest_metrics(state)
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder.is_dir() else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None:
            shutil.rmtree(folder, ignore_errors=True)


def latest_metrics(state) -> dict:
    """The step and the latest value of every number logged so far (loss, learning rate, eval metrics)."""
    return {**latest_numbers(state.log_history), "step": state.global_step}


def latest_numbers(records) -> dict:
    """The latest value of every number in a sequence of log records (log_history, metrics.jsonl)."""
    metrics: dict = {}
    for entry in records:
        metrics.update({key: value for key, value in entry.items() if isinstance(value, int | float)})
    return metrics
