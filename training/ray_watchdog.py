"""Tear the embedded Ray down with its driver, even when the driver is SIGKILLed.

Ray's processes outlive a killed driver: the GCS and raylet go, but the dashboard and runtime-env agents keep
running for minutes and ignore SIGTERM. Before `ray.init`, `lorafleet train` starts this watchdog with a pipe;
after it, the driver writes the session folder down the pipe. Every second the watchdog records the driver's
children that belong to that session and all their descendants. When the pipe closes (the driver exited or was
killed: nothing can skip that), it sends SIGTERM to every recorded process still alive, then SIGKILL.

    python -m lorafleet.training.ray_watchdog DRIVER_PID     (started by `start_watchdog`, not by hand)
"""

from __future__ import annotations

import subprocess
import sys
import threading

import psutil

GRACE_S = 3.0
POLL_S = 1.0


def start_watchdog() -> subprocess.Popen:
    """The watchdog of this process; hand it the session with `watch_session`.

    At a normal exit Ray is shut down first (its own atexit hook, registered when Ray was imported, would run
    after this one), then the pipe is closed and the watchdog awaited: it kills what the shutdown left (Ray's
    agents) and exits.
    """
    import atexit
    import os

    watchdog = subprocess.Popen(
        [sys.executable, "-m", "lorafleet.training.ray_watchdog", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C of the driver's terminal must not stop the watchdog first
    )
    atexit.register(stop_watchdog, watchdog)
    return watchdog


def stop_watchdog(watchdog: subprocess.Popen) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        if watchdog.stdin is not None:
            watchdog.stdin.close()
        watchdog.wait(timeout=GRACE_S + 5)
    except (OSError, subprocess.TimeoutExpired):
        watchdog.kill()
        watchdog.wait()


def watch_session(watchdog: subprocess.Popen, session_dir: str) -> None:
    assert watchdog.stdin is not None
    watchdog.stdin.write(f"{session_dir}\n".encode())
    watchdog.stdin.flush()


def ray_processes(driver: psutil.Process, session_dir: str, known: dict[int, float]) -> None:
    """Add to `known` (pid → start time) the driver's children of this Ray session and all their descendants."""
    for child in driver.children():
        try:
            if not any(session_dir in part for part in child.cmdline()):
                continue
            for process in [child, *child.children(recursive=True)]:
                known[process.pid] = process.create_time()
        except psutil.Error:
            continue


def kill_all(known: dict[int, float]) -> None:
    alive = []
    for pid, started in known.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:  # the same process, not a reused pid
                process.terminate()
                alive.append(process)
        except psutil.Error:
            continue
    _, survivors = psutil.wait_procs(alive, timeout=GRACE_S)
    for process in survivors:
        try:
            process.kill()
        except psutil.Error:
            pass


def main(driver_pid: int) -> None:
    driver = psutil.Process(driver_pid)
    session: list[str] = []
    gone = threading.Event()

    def read_pipe() -> None:
        for line in sys.stdin:
            session.append(line.strip())
        gone.set()

    threading.Thread(target=read_pipe, daemon=True).start()
    known: dict[int, float] = {}
    while not gone.wait(POLL_S):
        if session:
            try:
                ray_processes(driver, session[-1], known)
            except psutil.Error:
                break  # the driver is gone; the pipe says so too
    kill_all(known)


if __name__ == "__main__":
    main(int(sys.argv[1]))
