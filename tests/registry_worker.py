"""A warm fork server for tests/test_registry.py: publishes in child processes the test can SIGKILL or race.

    python tests/registry_worker.py            # then, one command per line on stdin:
    one STORAGE NAME ADAPTER_DIR               # → "started PID", later "done PID RC SECONDS" (RC -9: killed)
    many N STORAGE NAME ADAPTER_DIR            # N children released at the same instant → N "done ..." lines

Imports happen once here, so each child is only the publish itself: kills land inside the publish window.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

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


if __name__ == "__main__":
    main()
