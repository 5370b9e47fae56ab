"""Serving: vLLM's OpenAI-compatible multi-LoRA API, on the CPU engine here or on vLLM (GPUs).

    config.py          ServingConfig (one typed object for both engines; YAML + flags)
    protocol.py        request/response shapes (server, tests, client)
    app.py             FastAPI routes, error contract; middleware.py (auth, body limit, metrics); metrics.py
    engine.py          CPUEngine: continuous batching on one model thread; request_queue.py (queue + streams);
                       kv_cache.py (padded KV cache of a running batch); sampling.py (tokens, stop strings)
    adapters.py        which adapter folders may be served; adapter_store.py (loaded adapters, per-row routing)
    server.py          run in the foreground (`lorafleet serve`) or in a thread (tests)
    vllm.py            the `vllm serve` command for a ServingConfig
    client.py          typed admin client (models, load, unload) for either engine
    testing.py         random adapters for tests and benchmarks

`lorafleet.serving` imports the shared `lorafleet` modules, never `lorafleet.training`.
"""
