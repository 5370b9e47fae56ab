"""A KubeRay worker pod's preStop hook: hand the pod's termination to its Ray Train workers as SIGTERM.

Kubernetes signals only a container's first process (for a Ray pod, the shell around `ray start --block`),
so the training workers would see nothing before the SIGKILL. This hook, run by the kubelet before that
signal, sends SIGTERM to every Ray Train worker process in the container (they checkpoint their step, see
lorafleet.training.preemption) and waits until they are gone or the grace period is over.

    python -m lorafleet.pod_stop --wait SECONDS
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

WORKER_MARK = b"RayTrainWorker"  # Ray titles an actor's process ray::<class>


def train_worker_pids(mark: bytes = WORKER_MARK, proc: Path = Path("/proc")) -> list[int]:
    """The processes here whose command line holds `mark` (a zombie's is empty: it has exited)."""
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # it exited meanwhile, or is not ours to read
            continue
    return sorted(pids)


def stop_train_workers(wait_s: float, mark: bytes = WORKER_MARK) -> list[int]:
    """SIGTERM each Ray Train worker here, then wait up to `wait_s` for all of them to exit; the pids signalled."""
    signalled = []
    for pid in train_worker_pids(mark):
        try:
            os.kill(pid, signal.SIGTERM)
            signalled.append(pid)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and set(signalled) & set(train_worker_pids(mark)):
        time.sleep(0.5)
    return signalled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lorafleet.pod_stop", description=__doc__.splitlines()[0])
    parser.add_argument("--wait", type=float, required=True, help="seconds to wait for the workers to exit")
    args = parser.parse_args(argv)
    signalled = stop_train_workers(args.wait)
    print(f"lorafleet pod_stop: SIGTERM to {len(signalled)} Ray Train worker(s) {signalled}", flush=True)


if __name__ == "__main__":
    main()
