"""Handlers of the OpenAI-compatible routes, one per endpoint group, over the `Engine` of `serving.engine_api`.

models.py        GET /v1/models
generation.py    what completions and chat share: admission checks, sampling parameters, the response
streaming.py     server-sent events in OpenAI's chunk format, and per-request latency metrics
completions.py   POST /v1/completions
chat.py          POST /v1/chat/completions
adapters.py      POST /v1/load_lora_adapter, /v1/unload_lora_adapter
errors.py        every error as `{"error": {message, type, param, code}}`
"""
