"""Serving: vLLM's OpenAI-compatible multi-LoRA API, on the CPU engine here or on vLLM (GPUs).

    config.py          ServingConfig (one typed object for both engines; YAML + flags)
    protocol.py        request/response shapes (server, tests, client)
    app.py             thin FastAPI routes over handlers/ (models, completions, chat, adapters, errors);
                       middleware.py (auth, body limit, metrics); metrics.py
    engine_api.py      the Engine protocol the routes use (GenerationRequest, EngineStats, errors)
    engine.py          CPUEngine: continuous batching on one model thread; request_queue.py (queue + streams);
                       scheduler.py (admission, cohorts); model_runner.py (prefill/decode passes);
                       fault_isolation.py (a failed step re-run per adapter);
                       kv_cache.py (padded KV cache of a running batch); sampling.py (tokens, stop strings)
    adapters.py        which adapter folders may be served; adapter_store.py (loaded adapters, per-row routing)
    server.py          run in the foreground (`lorafleet serve`) or in a thread (tests)
    vllm.py            the `vllm serve` command for a ServingConfig
    client.py          typed admin client (models, load, unload) for either engine
    testing.py         random adapters for tests and benchmarks
    batch_inference.py `lorafleet batch` (offline JSONL); batch_rows.py (rows, output files); batch_send.py
                       (HTTP / in-process senders); batch_ray.py (Ray Data actors)
    sync.py            `lorafleet sync`: roll registry versions out to running servers

`lorafleet.serving` imports the shared `lorafleet` modules, never `lorafleet.training`.
"""
