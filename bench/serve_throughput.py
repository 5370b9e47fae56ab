"""Multi-adapter serving throughput of the CPU engine, against baselines measured in the same run.

    .venv/bin/python bench/serve_throughput.py                                     # tiny model, seconds
    .venv/bin/python bench/serve_throughput.py --model builtin:smollm2-135m-instruct --requests 16 --tokens 32

Prints tokens/s for:
- mixed:  REQUESTS requests spread over 4 LoRA adapters, sent at once (one mixed-adapter batch; LoRA layers run
          one pass over the stacked adapters, `serving/lora_stack.py`; `--peft-mixed`: PEFT's per-adapter loop);
- single: the same requests all for one adapter (the ceiling mixing should approach; goal >= 0.8x);
- naive:  one request at a time, `set_adapter` + `generate` per request (what mixing replaces; goal >= 3x);
and the hot-load latency of an adapter (`load_adapter` through the engine: checks + PEFT load), idle and
while a batch is decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ADAPTERS = ["a0", "a1", "a2", "a3"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--requests", type=int, default=32, help="requests per scenario (= the batch size)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--loads", type=int, default=5, help="hot-loads to time")
    parser.add_argument(
        "--peft-mixed", action="store_true", help="route mixed batches through PEFT's adapter_names forward instead"
    )
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of mixed and single (best is kept)")
    parser.add_argument(
        "--peer",
        choices=["llama.cpp", "vllm"],
        default=None,
        help="also run one-adapter and mixed over HTTP (the official openai client) against this peer and against "
        "lorafleet serve, and print lorafleet/peer (llama.cpp is built into the cache on first use: minutes; "
        "vllm: `make vllm`'s CPU build, base only too, float32 and bfloat16)",
    )
    return parser.parse_args()


async def _one(engine, prompt_ids, model, tokens, streams: list | None = None) -> int:
    from lorafleet.serving.engine_api import GenerationRequest
    from lorafleet.serving.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    stream = engine.submit(GenerationRequest(prompt_ids, model, params), asyncio.get_running_loop())
    if streams is not None:
        streams.append(stream)
    last = None
    async for delta in stream:
        if delta.error:
            raise delta.error
        last = delta
    return last.completion_tokens if last else 0


def engine_tokens_per_s(engine, prompts, models, tokens) -> float:
    async def main():
        started = time.perf_counter()
        counts = await asyncio.gather(*(_one(engine, p, m, tokens) for p, m in zip(prompts, models, strict=True)))
        return sum(counts) / (time.perf_counter() - started)

    return asyncio.run(main())


def naive_tokens_per_s(base_dir, adapter_dirs, prompts, models, tokens, threads) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dirs[0], ADAPTERS[0]
    )
    for name, folder in zip(ADAPTERS[1:], adapter_dirs[1:], strict=True):
        model.load_adapter(folder, name)
    model.eval()
    generated = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for prompt, name in zip(prompts, models, strict=True):
            model.set_adapter(name)
            ids = torch.tensor([prompt])
            out = model.generate(
                input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
            )
            generated += out.shape[1] - ids.shape[1]
    return generated / (time.perf_counter() - started)


def hot_load_ms(engine, adapter_dir, count, busy_prompt=None) -> list[float]:
    """Load + unload `count` times; with `busy_prompt`, while up to 8 requests decode (cancelled afterwards)."""
    busy = min(8, engine.config.max_batch_size)

    async def main():
        streams: list = []
        background = None
        if busy_prompt is not None:
            tokens = engine.config.max_tokens
            background = asyncio.gather(
                *(_one(engine, busy_prompt, ADAPTERS[i % 4], tokens, streams) for i in range(busy))
            )
            while engine.stats().running < busy:
                await asyncio.sleep(0.01)
        times = []
        for index in range(count):
            name = f"hot{index}-{int(busy_prompt is not None)}"
            started = time.perf_counter()
            await engine.load_adapter(name, str(adapter_dir))
            times.append((time.perf_counter() - started) * 1000)
            await engine.unload_adapter(name)
        if background is not None:
            for stream in streams:
                stream.cancel()
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
        return times

    return asyncio.run(main())


async def _http_one(client, model: str, prompt: str, tokens: int, extra: dict) -> int:
    answer = await client.completions.create(
        model=model, prompt=prompt, max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True, **extra}
    )
    return answer.usage.completion_tokens


def http_tokens_per_s(url: str, prompts: list[str], requests: list[tuple[str, dict]], tokens: int) -> float:
    """All requests at once through the official openai client; `requests`: (model, extra body) per prompt."""
    import openai

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as client:
            started = time.perf_counter()
            jobs = (_http_one(client, m, p, tokens, e) for p, (m, e) in zip(prompts, requests, strict=True))
            counts = await asyncio.gather(*jobs)
            return sum(counts) / (time.perf_counter() - started)

    return asyncio.run(main())


def peer_table(args: argparse.Namespace, config, base_dir, adapter_dirs) -> None:
    """lorafleet serve and llama.cpp's server, same weights (F32), same requests: one adapter, then 4 mixed."""
    from llama_cpp_peer import LlamaServer, convert, llama_server

    from lorafleet.serving.app import create_app
    from lorafleet.serving.server import ServerThread

    binary, source = llama_server()
    base_gguf, lora_ggufs = convert(source, Path(base_dir), adapter_dirs, Path(tempfile.mkdtemp(prefix="gguf-")))
    prompts = [f"Request {i}: describe item number {i} in a few words." for i in range(args.requests)]
    one = [ADAPTERS[0]] * args.requests
    mixed = [ADAPTERS[i % 4] for i in range(args.requests)]
    scenarios = {"one adapter": one, "4 adapters mixed": mixed}
    ours: dict[str, list[float]] = {name: [] for name in scenarios}
    theirs: dict[str, list[float]] = {name: [] for name in scenarios}
    with ServerThread(create_app(config)) as server:
        http_tokens_per_s(server.url, prompts[:4], [(m, {}) for m in mixed[:4]], 4)  # warm-up
        for _ in range(args.repeat):
            for name, models in scenarios.items():
                ours[name].append(http_tokens_per_s(server.url, prompts, [(m, {}) for m in models], args.tokens))
    threads = args.threads or os.cpu_count() or 1
    peer = LlamaServer(binary, base_gguf, lora_ggufs, slots=args.requests, threads=threads, context=512)
    try:
        lora = {name: {"lora": [{"id": index, "scale": 1.0}]} for index, name in enumerate(ADAPTERS)}
        http_tokens_per_s(peer.url, prompts[:4], [("base", lora[m]) for m in mixed[:4]], 4)
        for _ in range(args.repeat):
            for name, models in scenarios.items():
                requests = [("base", lora[m]) for m in models]
                theirs[name].append(http_tokens_per_s(peer.url, prompts, requests, args.tokens))
    finally:
        peer.close()
    print(f"\nover HTTP, {args.requests} requests at once x {args.tokens} tokens, F32 both, {threads} threads "
          f"(llama.cpp: {binary.parent.parent.parent.parent.name}, {args.requests} slots)")  # fmt: skip
    print(f"{'scenario':<18} {'lorafleet':>10} {'llama.cpp':>10} {'lorafleet/llama.cpp':>20}")
    for name in scenarios:
        a, b = max(ours[name]), max(theirs[name])
        print(f"{name:<18} {a:>10.1f} {b:>10.1f} {a / b:>19.2f}x")
    for side, runs in (("lorafleet", ours), ("llama.cpp", theirs)):
        print(f"{side} mixed/one = {max(runs['4 adapters mixed']) / max(runs['one adapter']):.2f}x")


def vllm_table(args: argparse.Namespace, config, adapter_dirs) -> None:
    """lorafleet serve (CPU engine) and vLLM's CPU build, same weights and requests: one adapter, 4 mixed, the
    base alone; in float32, then bfloat16 (each engine casts the same F32 checkpoint)."""
    from vllm_peer import VllmServer

    from lorafleet.serving.app import create_app
    from lorafleet.serving.server import ServerThread

    prompts = [f"Request {i}: describe item number {i} in a few words." for i in range(args.requests)]
    scenarios = {
        "one adapter": [ADAPTERS[0]] * args.requests,
        "4 adapters mixed": [ADAPTERS[i % 4] for i in range(args.requests)],
        "base only": ["base"] * args.requests,
    }
    threads = args.threads or os.cpu_count() or 1
    adapters = dict(zip(ADAPTERS, adapter_dirs, strict=True))
    rows = []
    for dtype in ("float32", "bfloat16"):
        server = ServerThread(create_app(config.model_copy(update={"dtype": dtype})))
        ours = _best_runs(server, prompts, scenarios, args)
        log = Path(tempfile.mkdtemp(prefix="vllm-bench-")) / "vllm.log"
        peer = VllmServer(args.model, adapters, dtype=dtype, threads=threads, log=log)
        try:
            theirs = _best_runs(contextlib.nullcontext(peer), prompts, scenarios, args)
        finally:
            peer.close()
        rows += [(dtype, name, ours[name], theirs[name]) for name in scenarios]
    shape = f"{args.requests} requests at once x {args.tokens} tokens, {threads} threads, best of {args.repeat}"
    print(f"\nover HTTP, {shape}")
    print(f"{'dtype':<9} {'scenario':<18} {'lorafleet':>10} {'vLLM CPU':>10} {'lorafleet/vLLM':>15}")
    for dtype, name, a, b in rows:
        print(f"{dtype:<9} {name:<18} {a:>10.1f} {b:>10.1f} {a / b:>14.2f}x")


def _best_runs(server_context, prompts, scenarios, args) -> dict[str, float]:
    with server_context as server:
        warm = [(m, {}) for m in scenarios["4 adapters mixed"][:4]]
        http_tokens_per_s(server.url, prompts[:4], warm, 4)
        runs: dict[str, list[float]] = {name: [] for name in scenarios}
        for _ in range(args.repeat):
            for name, models in scenarios.items():
                runs[name].append(http_tokens_per_s(server.url, prompts, [(m, {}) for m in models], args.tokens))
    return {name: max(values) for name, values in runs.items()}


def start_engine(args: argparse.Namespace):
    """(engine, base folder, adapter folders): the CPU engine serving four random LoRA adapters."""
    from lorafleet.models import resolve_model
    from lorafleet.serving.config import ServingConfig
    from lorafleet.serving.engine import CPUEngine
    from lorafleet.serving.testing import make_adapter

    base_dir = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    adapter_dirs = [
        make_adapter(base_dir, work / name, "lora", seed=i, rank=args.rank) for i, name in enumerate(ADAPTERS)
    ]
    config = ServingConfig(
        base=args.model,
        served_model_name="base",
        adapters={name: str(folder) for name, folder in zip(ADAPTERS, adapter_dirs, strict=True)},
        adapter_roots=[str(work)],
        max_batch_size=args.requests,
        max_queue=args.requests,
        max_loras=4,
        max_lora_rank=max(16, args.rank),
        max_tokens=args.tokens,
        torch_threads=args.threads,
    )
    engine = CPUEngine(config)
    engine.start()
    engine.store.stack_lora = not args.peft_mixed
    return engine, base_dir, adapter_dirs, config


def main() -> None:
    args = parse_args()
    import torch

    engine, base_dir, adapter_dirs, config = start_engine(args)
    tokenizer = engine.tokenizer
    prompts = [
        tokenizer(f"Request {i}: describe item number {i} in a few words.").input_ids for i in range(args.requests)
    ]
    mixed_models = [ADAPTERS[i % 4] for i in range(args.requests)]
    single_models = [ADAPTERS[0]] * args.requests

    engine_tokens_per_s(engine, prompts[:4], mixed_models[:4], 4)  # warm-up
    mixed_runs, single_runs = [], []
    for _ in range(args.repeat):  # interleaved, best of N: robust to other load on the machine
        mixed_runs.append(engine_tokens_per_s(engine, prompts, mixed_models, args.tokens))
        single_runs.append(engine_tokens_per_s(engine, prompts, single_models, args.tokens))
    idle_loads = hot_load_ms(engine, adapter_dirs[1], args.loads)
    busy_loads = hot_load_ms(engine, adapter_dirs[2], args.loads, busy_prompt=prompts[0])
    engine.shutdown()
    naive_requests = max(4, args.requests // 4)
    naive = naive_tokens_per_s(
        base_dir, adapter_dirs, prompts[:naive_requests], mixed_models[:naive_requests], args.tokens, args.threads
    )

    mixed, single = max(mixed_runs), max(single_runs)
    runs = ", ".join(f"{m:.0f}/{s:.0f}" for m, s in zip(mixed_runs, single_runs, strict=True))
    print(f"model {args.model} | {args.requests} requests x {args.tokens} tokens | LoRA r={args.rank} | "
          f"torch threads {args.threads or torch.get_num_threads()} | {os.cpu_count()} CPUs | "
          f"mixed LoRA: {'PEFT adapter_names' if args.peft_mixed else 'stacked'}")  # fmt: skip
    print(f"mixed (4 adapters, one batch)  {mixed:9.1f} tok/s")
    print(f"single adapter, same batch     {single:9.1f} tok/s   (mixed/single runs: {runs})")
    print(f"naive (one request at a time)  {naive:9.1f} tok/s   ({naive_requests} requests, set_adapter + generate)")
    # Each mixed run is next to its single run in time, so their ratio sees the same background load.
    pair_ratio = statistics.median(m / s for m, s in zip(mixed_runs, single_runs, strict=True))
    print(f"mixed / single = {mixed / single:.2f}x best runs, {pair_ratio:.2f}x median of pairs (goal >= 0.8x)")
    print(f"mixed / naive  = {mixed / naive:.2f}x (goal >= 3x)")
    print(
        f"hot-load latency: idle median {statistics.median(idle_loads):.1f} ms (max {max(idle_loads):.1f}); "
        f"during decoding median {statistics.median(busy_loads):.1f} ms (max {max(busy_loads):.1f})"
    )
    if args.peer == "llama.cpp":
        peer_table(args, config, base_dir, adapter_dirs)
    elif args.peer == "vllm":
        vllm_table(args, config, adapter_dirs)


if __name__ == "__main__":
    main()
