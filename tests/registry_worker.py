"""A warm fork server for tests/test_registry.py: publishes in child processes the test can SIGKILL or race.

    python tests/registry_worker.py            # then, one command per line on stdin:
    one STORAGE NAME ADAPTER_DIR               # → "started PID", later "done PID RC SECONDS" (RC -9: killed)
    many N STORAGE NAME ADAPTER_DIR            # N children released at the same instant → N "done ..." lines

Imports happen once here, so each child is only the publish itself: kills land inside the publish window.
Tests drive it through `ForkServer`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import peft  # noqa: F401 - publish imports it on first use; here once, not in every child
import safetensors.torch  # noqa: F401 - the same: weights are checked with it

from lorafleet.registry import publish_adapter


def _child(storage: str, name: str, adapter_dir: str, gate: int | None = None) -> None:
    try:
        if gate is not None:
            os.read(gate, 1)  # blocks until the parent closes the write end: all children start together
        published = publish_adapter(storage, name, Path(adapter_dir))
        print(f"published {published.version}", flush=True)
        os._exit(0)
    except BaseException as exc:  # report, never fall back into the server loop
        print(f"child error {exc!r}", file=sys.stderr, flush=True)
        os._exit(1)


def _reap(started: dict[int, float]) -> None:
    while started:
        pid, status = os.wait()
        seconds = time.monotonic() - started.pop(pid)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"done {pid} {code} {seconds:.4f}", flush=True)


def main() -> None:
    for line in sys.stdin:
        command, *args = line.split()
        if command == "one":
            started = time.monotonic()
            pid = os.fork()
            if pid == 0:
                _child(*args)
            print(f"started {pid}", flush=True)
            _reap({pid: started})
        elif command == "many":
            count, *publish_args = args
            gate_read, gate_write = os.pipe()
            children = {}
            for _ in range(int(count)):
                pid = os.fork()
                if pid == 0:
                    os.close(gate_write)
                    _child(*publish_args, gate=gate_read)
                children[pid] = time.monotonic()
            os.close(gate_read)
            os.close(gate_write)
            _reap(children)


class ForkServer:
    """This file run as a process: it imports once, then publishes in forked children a test can SIGKILL or race.
    `env` is added to the environment (an object store's endpoint and keys)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        repo = Path(__file__).resolve().parents[1]
        environment = {**os.environ, "PYTHONPATH": str(repo), **(env or {})}
        command = [sys.executable, __file__]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=environment)  # fmt: skip

    def send(self, *words: object) -> None:
        self.process.stdin.write(" ".join(map(str, words)) + "\n")
        self.process.stdin.flush()

    def expect(self, prefix: str) -> list[str]:
        """The next line starting with `prefix` (children's own `published` lines are skipped)."""
        while line := self.process.stdout.readline():
            if line.startswith(prefix):
                return line.split()[1:]
        raise AssertionError(f"worker exited before printing {prefix!r}")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


if __name__ == "__main__":
    main()
