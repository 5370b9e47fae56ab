"""Local Ray clusters for tests: stop only the processes of one cluster (its temp dir, its GCS address)."""

from __future__ import annotations

import time
from pathlib import Path

RAY_WORKER_PORTS = range(10000, 20001)  # around Ray's default worker port range (10002-19999)


def stop_ray_processes(temp_dir: str) -> None:
    """Stop only this cluster's processes: those naming its temp dir or GCS address, and their children."""
    import psutil

    marker = Path(temp_dir) / "ray_current_cluster"
    processes = processes_naming([temp_dir] + ([marker.read_text().strip()] if marker.is_file() else []))
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass

    def running(process) -> bool:  # zombies are done: their parent (often init) reaps them later
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 5
    while (alive := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def processes_naming(needles: list[str]) -> set:
    """The processes with any of `needles` in an argument of their command line, and all their children."""
    import psutil

    found = set()
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(needle in arg for arg in process.info["cmdline"] or [] for needle in needles):
                found |= {process, *process.children(recursive=True)}
        except psutil.Error:
            continue
    return found

