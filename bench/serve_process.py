"""`lorafleet serve` in its own process for the serving benches: a free port, a log file, ready once /health is.

The CPU engine is measured this way, as a user runs it, rather than on a thread of the bench: the bench's own
process has run torch on its main thread, and a second OpenMP team on the same cores slows the engine's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


class ServeProcess:
    """`lorafleet serve ARGS --port P --served-model-name base --adapter NAME=DIR ...`, waited for until healthy."""

    def __init__(self, args: list[str], adapters: dict[str, Path], *, log: Path, env: dict[str, str] | None = None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "lorafleet",
            "serve",
            *args,
            "--served-model-name",
            "base",
            "--port",
            str(port),
        ]
        for name, folder in adapters.items():
            command += ["--adapter", f"{name}={folder}"]
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_healthy(600)

    def _wait_healthy(self, timeout: float) -> None:
        try:
            wait_healthy(self.process, self.url, timeout)
        except RuntimeError as error:
            self.close()
            raise RuntimeError(f"{error}; its log: {self.log_path}") from None

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self.log.close()


def wait_healthy(process: subprocess.Popen, url: str, timeout: float) -> None:
    """Until `url`/health answers 200; RuntimeError if `process` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode})")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start in {timeout:.0f} s")
        time.sleep(0.5)
