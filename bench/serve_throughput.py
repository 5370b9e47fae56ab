"""Multi-adapter serving throughput of the CPU engine, against baselines measured in the same run.

    .venv/bin/python bench/serve_throughput.py                                     # tiny model, seconds
    .venv/bin/python bench/serve_throughput.py --model builtin:smollm2-135m-instruct --requests 16 --tokens 32

Prints tokens/s for:
- mixed:  REQUESTS requests spread over 4 LoRA adapters, sent at once (one mixed-adapter batch; LoRA layers run
          one pass over the stacked adapters, `serving/lora_stack.py`; `--peft-mixed`: PEFT's per-adapter loop);
- single: the same requests all for one adapter (the ceiling mixing should approach; goal >= 0.8x);
- base:   the same requests for the base model, four adapters loaded (a batch of base rows skips the LoRA
          layers; goal: at least the single-adapter rate);
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

from peers import PEERS, peer_tables  # noqa: E402 (bench/ is the script's folder)


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
        action="append",
        choices=["vllm", "llama.cpp", "all"],
        default=[],
        help="also run one adapter, four mixed and the base alone over HTTP (the official openai client), float32 "
        "and bfloat16, against lorafleet serve and this peer (repeatable; all: both) and print lorafleet/peer "
        "(vllm: `make vllm`'s CPU build; llama.cpp is built into the cache on first use: minutes)",
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
    return engine, base_dir, adapter_dirs


def main() -> None:
    args = parse_args()
    import torch

    engine, base_dir, adapter_dirs = start_engine(args)
    tokenizer = engine.tokenizer
    prompts = [
        tokenizer(f"Request {i}: describe item number {i} in a few words.").input_ids for i in range(args.requests)
    ]
    mixed_models = [ADAPTERS[i % 4] for i in range(args.requests)]
    single_models = [ADAPTERS[0]] * args.requests
    base_models = ["base"] * args.requests

    engine_tokens_per_s(engine, prompts[:4], mixed_models[:4], 4)  # warm-up
    mixed_runs, single_runs, base_runs = [], [], []
    for _ in range(args.repeat):  # interleaved, best of N: robust to other load on the machine
        mixed_runs.append(engine_tokens_per_s(engine, prompts, mixed_models, args.tokens))
        single_runs.append(engine_tokens_per_s(engine, prompts, single_models, args.tokens))
        base_runs.append(engine_tokens_per_s(engine, prompts, base_models, args.tokens))
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
    print(f"base only, same batch          {max(base_runs):9.1f} tok/s   {engine.describe_settings()}")
    print(f"naive (one request at a time)  {naive:9.1f} tok/s   ({naive_requests} requests, set_adapter + generate)")
    # Each mixed run is next to its single run in time, so their ratio sees the same background load.
    pair_ratio = statistics.median(m / s for m, s in zip(mixed_runs, single_runs, strict=True))
    print(f"mixed / single = {mixed / single:.2f}x best runs, {pair_ratio:.2f}x median of pairs (goal >= 0.8x)")
    print(f"mixed / naive  = {mixed / naive:.2f}x (goal >= 3x)")
    print(f"base / single  = {max(base_runs) / single:.2f}x (goal >= 1x: the base path at least as fast)")
    print(
        f"hot-load latency: idle median {statistics.median(idle_loads):.1f} ms (max {max(idle_loads):.1f}); "
        f"during decoding median {statistics.median(busy_loads):.1f} ms (max {max(busy_loads):.1f})"
    )
    peers = [peer for peer in PEERS if peer in args.peer or "all" in args.peer]
    if peers:
        peer_tables(args, base_dir, dict(zip(ADAPTERS, adapter_dirs, strict=True)), peers, http_tokens_per_s)


if __name__ == "__main__":
    main()
