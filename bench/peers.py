"""lorafleet serve beside its peers in one run (`bench/serve_throughput.py --peer vllm|llama.cpp|all`): the same
weights, the same requests over HTTP through the official openai client, in float32 and then bfloat16.

Scenarios: one adapter, four adapters mixed in one batch, the base alone. Each engine casts the same F32
checkpoint (vLLM and the CPU engine at load; llama.cpp's converter writes F32 or BF16 GGUF files). Each server
runs alone on the machine while it is measured; the best of `--repeat` runs is kept. lorafleet is `lorafleet
serve` in its own process with the settings it ships (max_batch_size and the rest left to their defaults; only
the dtype is set); vLLM with its own defaults; llama.cpp with one slot per request.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

PEERS = ("vllm", "llama.cpp")
DTYPES = ("float32", "bfloat16")
LABELS = {"lorafleet": "lorafleet", "vllm": "vLLM CPU", "llama.cpp": "llama.cpp"}
GOALS = {  # lorafleet / peer at equal precision, shipped defaults
    ("llama.cpp", "one adapter"): 1.0,
    ("llama.cpp", "4 adapters mixed"): 2.5,
    ("vllm", "one adapter"): 1.5,
    ("vllm", "4 adapters mixed"): 1.5,
    ("vllm", "base only"): 1.0,
}


def peer_tables(args: argparse.Namespace, base_dir: Path, adapters: dict[str, Path], peers: list[str], measure):
    """Measure lorafleet and each peer per dtype and scenario; print tokens/s and lorafleet/peer.

    `measure(url, prompts, [(model, extra body)], tokens)` -> tokens/s of all requests sent at once.
    """
    names = list(adapters)
    prompts = [f"Request {i}: describe item number {i} in a few words." for i in range(args.requests)]
    scenarios = {
        "one adapter": [names[0]] * args.requests,
        "4 adapters mixed": [names[i % len(names)] for i in range(args.requests)],
        "base only": ["base"] * args.requests,
    }
    threads = args.threads or os.cpu_count() or 1
    llama = _llama_build() if "llama.cpp" in peers else None
    results: dict[tuple[str, str], dict[str, float]] = {}
    for dtype in DTYPES:
        servers = {"lorafleet": lambda dtype=dtype: _lorafleet(args.model, adapters, dtype)}
        if "vllm" in peers:
            servers["vllm"] = lambda dtype=dtype: _vllm(args.model, adapters, dtype, threads)
        if llama is not None:
            servers["llama.cpp"] = lambda dtype=dtype: _llama(llama, base_dir, adapters, dtype, threads, args)
        for side, start in servers.items():
            body = _llama_body(names) if side == "llama.cpp" else None
            with start() as server:
                measure(server.url, prompts[:4], _requests(scenarios["4 adapters mixed"][:4], body), 4)  # warm-up
                for name, best in _best_of(server.url, prompts, scenarios, body, args, measure).items():
                    results.setdefault((dtype, name), {})[side] = best
    _print(results, peers, f"{args.requests} requests at once x {args.tokens} tokens, {threads} threads, "
           f"best of {args.repeat}")  # fmt: skip


def _best_of(url, prompts, scenarios, body, args, measure) -> dict[str, float]:
    runs: dict[str, list[float]] = {name: [] for name in scenarios}
    for _ in range(args.repeat):
        for name, models in scenarios.items():
            runs[name].append(measure(url, prompts, _requests(models, body), args.tokens))
    return {name: max(values) for name, values in runs.items()}


def _requests(models: list[str], llama_body: dict | None) -> list[tuple[str, dict]]:
    """(model, extra body) per request: llama.cpp serves one model and picks adapters by `lora` scales."""
    if llama_body is None:
        return [(model, {}) for model in models]
    return [("base", llama_body.get(model, {})) for model in models]


def _llama_body(names: list[str]) -> dict[str, dict]:
    return {name: {"lora": [{"id": index, "scale": 1.0}]} for index, name in enumerate(names)}


def _print(results: dict[tuple[str, str], dict[str, float]], peers: list[str], shape: str) -> None:
    print(f"\nover HTTP, {shape}")
    header = f"{'dtype':<9} {'scenario':<18} {'lorafleet':>10}"
    header += "".join(f" {LABELS[p]:>10} {'lorafleet/' + LABELS[p]:>20}" for p in peers)
    print(header)
    for (dtype, name), sides in results.items():
        line = f"{dtype:<9} {name:<18} {sides['lorafleet']:>10.1f}"
        line += "".join(f" {sides[p]:>10.1f} {sides['lorafleet'] / sides[p]:>19.2f}x" for p in peers)
        print(line)
    for (dtype, name), sides in results.items():
        for peer in peers:
            goal = GOALS.get((peer, name))
            if goal is not None:
                ratio = sides["lorafleet"] / sides[peer]
                verdict = "met" if ratio >= goal else "MISSED"
                print(f"goal {dtype} {name}: lorafleet / {LABELS[peer]} {ratio:.2f}x (>= {goal}x): {verdict}")


def _lorafleet(model: str, adapters: dict[str, Path], dtype: str):
    from serve_process import ServeProcess

    log = Path(tempfile.mkdtemp(prefix="lorafleet-bench-")) / "serve.log"
    return ServeProcess(["--engine", "cpu", "--base", model, "--dtype", dtype], adapters, log=log)


def _vllm(model: str, adapters: dict[str, Path], dtype: str, threads: int):
    from vllm_peer import vllm_server

    log = Path(tempfile.mkdtemp(prefix="vllm-bench-")) / "vllm.log"
    return vllm_server(model, adapters, dtype=dtype, threads=threads, log=log)


def _llama_build():
    from llama_cpp_peer import llama_server

    return llama_server()


def _llama(build, base_dir: Path, adapters: dict[str, Path], dtype: str, threads: int, args):
    from llama_cpp_peer import LlamaServer, convert

    binary, source = build
    outtype = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    out = Path(tempfile.mkdtemp(prefix=f"gguf-{outtype}-"))
    base, loras = convert(source, base_dir, list(adapters.values()), out, outtype=outtype)
    return LlamaServer(binary, base, loras, slots=args.requests, threads=threads, context=512)
