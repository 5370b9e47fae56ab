"""vLLM as the peer of `bench/serve_throughput.py --peer vllm`: the CPU build that `make vllm` installs, started
through `lorafleet serve --engine vllm` (the same argv the project ships) with the bench's base and adapters.

    .venv/bin/python bench/serve_throughput.py --model builtin:smollm2-135m-instruct --requests 16 --tokens 64 \
        --threads 2 --peer vllm
"""

from __future__ import annotations

from pathlib import Path

from serve_process import ServeProcess  # bench/serve_process.py

# vLLM's CPU build: KV cache space in GiB, OpenMP threads on the cores the bench was given
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


def vllm_server(base: str, adapters: dict[str, Path], *, dtype: str, threads: int, log: Path) -> ServeProcess:
    """`lorafleet serve --engine vllm` on a free port; the base served as `base`, each adapter by its name."""
    args = ["--engine", "vllm", "--base", base, "--max-model-len", "512", "--dtype", dtype,
            "--max-loras", str(len(adapters)), "--max-lora-rank", "16"]  # fmt: skip
    env = {**CPU_ENV, "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    return ServeProcess(args, adapters, log=log, env=env)
