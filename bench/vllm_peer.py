"""vLLM as the peer of `bench/serve_throughput.py --peer vllm`: the CPU build that `make vllm` installs, started
through `lorafleet serve --engine vllm` (the same argv the project ships) with the bench's base and adapters.

    .venv/bin/python bench/serve_throughput.py --model builtin:smollm2-135m-instruct --requests 16 --tokens 64 \
        --threads 2 --peer vllm
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

# vLLM's CPU build: KV cache space in GiB, OpenMP threads on the cores the bench was given
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


class VllmServer:
    """`lorafleet serve --engine vllm` on a free port; the base served as `base`, each adapter by its name."""

    def __init__(self, base: str, adapters: dict[str, Path], *, dtype: str, threads: int, log: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "lorafleet", "serve", "--engine", "vllm", "--base", base,
                   "--served-model-name", "base", "--port", str(port), "--max-model-len", "512", "--dtype", dtype,
                   "--max-loras", str(len(adapters)), "--max-lora-rank", "16"]  # fmt: skip
        for name, folder in adapters.items():
            command += ["--adapter", f"{name}={folder}"]
        env = {**os.environ, **CPU_ENV, "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
        self.log = open(log, "w")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.process.returncode}); its log: {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"vLLM did not start in 600 s; its log: {log}")
            time.sleep(1)

    def __enter__(self) -> VllmServer:
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
