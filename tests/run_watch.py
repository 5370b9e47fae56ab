"""Watching a `lorafleet train` subprocess: its metrics, the checkpoints Ray registered, a fault injected mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from tests.helpers import REPO


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def registered_checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray's controller has registered (a checkpoint is complete only from then on)."""
    snapshot = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []
    return [int(result["metrics"]["step"]) for result in results]


def train_workers(root: psutil.Process) -> list[psutil.Process]:
    workers = []
    for process in root.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:
            continue
    return workers


def run(
    command: list[str], run_dir: Path, *, kill: bool = False, timeout: float = 900, watch=None, on_start=None,
    env: dict[str, str] | None = None,
):
    """Run the CLI; with `kill`, SIGKILL one train worker once Ray has registered a checkpoint and training
    has moved past it (so there is work to lose and a checkpoint to come back to). `watch()`, if given, is
    called while the run goes on until it returns True (a test's own fault to inject); `on_start(pid)` is told
    the CLI's process id first; `env` is added to this process's environment.

    Returns (result with stdout+stderr in stdout, pid killed or None). Output goes to a file: a full pipe would
    block the run while it is being watched.
    """
    log_path = run_dir.parent / f"{run_dir.name}-{time.monotonic_ns()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 - closed below, after the process ends
    process = subprocess.Popen(
        command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    killed = None
    if on_start is not None:
        on_start(process.pid)
    try:
        deadline = time.monotonic() + timeout
        while watch is not None and process.poll() is None and time.monotonic() < deadline and not watch():
            time.sleep(0.1)
        if kill:
            deadline = time.monotonic() + timeout
            root = psutil.Process(process.pid)
            while killed is None and process.poll() is None and time.monotonic() < deadline:
                registered = registered_checkpoint_steps(run_dir)
                steps = [record["step"] for record in read_metrics(run_dir) if "loss" in record]
                workers = train_workers(root)
                if registered and steps and max(steps) > max(registered) and len(workers) == 2:
                    victim = workers[-1]
                    os.kill(victim.pid, signal.SIGKILL)
                    killed = victim.pid
                time.sleep(0.05)
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    return subprocess.CompletedProcess(command, process.returncode, log_path.read_text(), ""), killed


def final_loss(run_dir: Path, steps: int) -> float:
    return [record for record in read_metrics(run_dir) if "loss" in record and record["step"] == steps][-1]["loss"]
