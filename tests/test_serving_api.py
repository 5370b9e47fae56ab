"""The OpenAI-compatible API over real HTTP: uvicorn on 127.0.0.1, the official `openai` client, httpx.

One server (tiny model, adapters `a` and `b`) serves most tests; auth, queue bounds and shutdown get servers of
their own. The error contract table sends bad requests and checks status + OpenAI-shaped error; the server
keeps serving afterwards. The load test (slow) runs 64 concurrent streaming clients.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from lorafleet.serving.app import create_app
from lorafleet.serving.client import ServingAPIError, ServingClient
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.server import ServerThread, free_port
from tests.helpers import BASE_ID, REPO, tiny_serving_config, two_adapters

PROMPTS = ["Hello there", "The quick brown fox", "x", "Once upon a time"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return two_adapters(tiny_model_dir, tmp_path_factory.mktemp("api-adapters"))


def config_for(tiny_model_dir, adapter_dir, **changes) -> ServingConfig:
    values = {"adapter_roots": [str(adapter_dir)], "max_request_bytes": 64 * 1024, "drain_timeout_s": 10}
    return tiny_serving_config(tiny_model_dir, adapter_dir, **{**values, **changes})


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dir):
    with ServerThread(create_app(config_for(tiny_model_dir, adapter_dir))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def complete(client, model, prompt, **kwargs) -> str:
    kwargs = {"max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}, **kwargs}
    return client.completions.create(model=model, prompt=prompt, **kwargs).choices[0].text


def test_models_lists_base_and_adapters_with_parent(client, adapter_dir):
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {BASE_ID, "a", "b"}
    assert cards[BASE_ID].parent is None and cards[BASE_ID].max_model_len == 256
    assert (cards["a"].parent, cards["a"].root) == (BASE_ID, str(adapter_dir / "a"))
    assert cards["b"].parent == BASE_ID


def test_answers_differ_by_adapter(client):
    answers = {model: complete(client, model, PROMPTS[0]) for model in (BASE_ID, "a", "b")}
    assert len(set(answers.values())) == 3, answers


def test_completion_shape_and_usage(client):
    result = client.completions.create(model="a", prompt="Hello", max_tokens=5, temperature=0)
    assert result.object == "text_completion" and result.model == "a" and result.id.startswith("cmpl-")
    assert result.usage.completion_tokens == 5 and result.usage.total_tokens == result.usage.prompt_tokens + 5
    assert result.choices[0].finish_reason == "length"


def test_chat_streamed_equals_not_streamed(client):
    request = {
        "model": "b",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.chat.completions.create(**request)
    assert whole.object == "chat.completion" and whole.model == "b"
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_async_concurrent_mixed_adapters_match_sequential(server, client):
    """Requests for different adapters sent at once (one mixed batch) answer as each adapter alone."""
    jobs = [(model, prompt) for prompt in PROMPTS[:2] for model in (BASE_ID, "a", "b")]
    alone = [complete(client, model, prompt) for model, prompt in jobs]

    async def together():
        async_client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        async with async_client:

            async def one(model, prompt, stream):
                kwargs = {"max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
                if not stream:
                    result = await async_client.completions.create(model=model, prompt=prompt, **kwargs)
                    return result.choices[0].text
                parts = []
                async for chunk in await async_client.completions.create(
                    model=model, prompt=prompt, stream=True, **kwargs
                ):
                    parts.append(chunk.choices[0].text if chunk.choices else "")
                return "".join(parts)

            return await asyncio.gather(*(one(m, p, i % 2 == 0) for i, (m, p) in enumerate(jobs)))

    assert asyncio.run(together()) == alone


def test_seeded_sampling_over_http(client):
    def sample(seed):
        return complete(client, "a", "Hello", temperature=0.9, top_p=0.95, seed=seed)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_sequences(client):
    for model, prompt in [(m, p) for p in PROMPTS for m in ("a", "b", BASE_ID)]:
        full = complete(client, model, prompt)
        clean = [
            i for i in range(1, len(full) - 1) if "\ufffd" not in full[: i + 2] and full.index(full[i : i + 2]) == i
        ]
        if clean:
            break
    at = clean[0]
    result = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stop=[full[at : at + 2]],
        extra_body={"ignore_eos": True},
    )
    assert result.choices[0].text == full[:at]
    assert result.choices[0].finish_reason == "stop"


def test_runtime_load_and_unload(server, client, adapter_dir, tmp_path_factory):
    expected_b = complete(client, "b", PROMPTS[0])
    expected_a = complete(client, "a", PROMPTS[0])
    with ServingClient(server.url) as admin:
        message = admin.load_adapter("c", str(adapter_dir / "b"))
        assert message == "Success: LoRA adapter 'c' added successfully."
        assert admin.adapters()["c"] == str(adapter_dir / "b")
        assert complete(client, "c", PROMPTS[0]) == expected_b
        with pytest.raises(ServingAPIError) as again:
            admin.load_adapter("c", str(adapter_dir / "a"))
        assert again.value.status == 400 and "load_inplace" in again.value.message
        admin.load_adapter("c", str(adapter_dir / "a"), load_inplace=True)
        assert complete(client, "c", PROMPTS[0]) == expected_a
        assert admin.unload_adapter("c") == "Success: LoRA adapter 'c' removed successfully."
        with pytest.raises(ServingAPIError) as gone:
            admin.unload_adapter("c")
        assert gone.value.status == 404
        assert set(admin.adapters()) == {"a", "b"}
    with pytest.raises(openai.NotFoundError):
        complete(client, "c", PROMPTS[0])


def _bad_base_adapter(adapter_dir) -> str:
    folder = adapter_dir / "bad-base"
    if not folder.exists():
        folder.mkdir()
        for name in ("adapter_model.safetensors",):
            (folder / name).write_bytes((adapter_dir / "a" / name).read_bytes())
        config = json.loads((adapter_dir / "a" / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    return str(folder)


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LOAD = "/v1/load_lora_adapter"
USER = [{"role": "user", "content": "hi"}]
# (id, path, json body or raw bytes, expected status, expected error type, expected param)
BAD_REQUESTS = [
    ("unknown-model", COMPLETIONS, {"model": "nope", "prompt": "x"}, 404, "NotFoundError", "model"),
    ("unknown-model-chat", CHAT, {"model": "nope", "messages": USER}, 404, "NotFoundError", "model"),
    ("bad-json", COMPLETIONS, b'{"model": "a", "prompt": ', 400, "BadRequestError", None),
    (
        "wrong-type",
        COMPLETIONS,
        {"model": "a", "prompt": "x", "max_tokens": "ten"},
        400,
        "BadRequestError",
        "max_tokens",
    ),
    (
        "negative-max-tokens",
        COMPLETIONS,
        {"model": "a", "prompt": "x", "max_tokens": -1},
        400,
        "BadRequestError",
        "max_tokens",
    ),
    (
        "above-token-cap",
        COMPLETIONS,
        {"model": "a", "prompt": "x", "max_tokens": 65},
        400,
        "BadRequestError",
        "max_tokens",
    ),
    ("huge-prompt", COMPLETIONS, {"model": "a", "prompt": "y" * 300}, 400, "BadRequestError", "prompt"),
    (
        "prompt-plus-tokens",
        CHAT,
        {"model": "a", "messages": [{"role": "user", "content": "z" * 200}], "max_tokens": 60},
        400,
        "BadRequestError",
        "max_tokens",
    ),
    ("n-above-limit", CHAT, {"model": "a", "messages": USER, "n": 20}, 400, "BadRequestError", "n"),
    ("unknown-field", CHAT, {"model": "a", "messages": USER, "frobnicate": 1}, 400, "BadRequestError", "frobnicate"),
    ("empty-messages", CHAT, {"model": "a", "messages": []}, 400, "BadRequestError", "messages"),
    (
        "bad-role",
        CHAT,
        {"model": "a", "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "BadRequestError",
        "messages",
    ),
    ("missing-messages", CHAT, {"model": "a"}, 400, "BadRequestError", "messages"),
    (
        "temperature-range",
        CHAT,
        {"model": "a", "messages": USER, "temperature": 7},
        400,
        "BadRequestError",
        "temperature",
    ),
    ("logprobs", CHAT, {"model": "a", "messages": USER, "logprobs": True}, 400, "BadRequestError", "logprobs"),
    ("tools", CHAT, {"model": "a", "messages": USER, "tools": [{"type": "function"}]}, 400, "BadRequestError", "tools"),
    ("empty-prompt", COMPLETIONS, {"model": "a", "prompt": ""}, 400, "BadRequestError", "prompt"),
    ("token-out-of-vocab", COMPLETIONS, {"model": "a", "prompt": [1, 2, 10**6]}, 400, "BadRequestError", "prompt"),
    ("several-prompts", COMPLETIONS, {"model": "a", "prompt": ["x", "y"]}, 400, "BadRequestError", "prompt"),
    ("body-too-large", COMPLETIONS, {"model": "a", "prompt": "x" * 70_000}, 413, "RequestTooLargeError", None),
    ("unknown-route", "/v1/embeddings", {"model": "a", "input": "x"}, 404, "NotFoundError", None),
    ("load-outside-roots", LOAD, {"lora_name": "x", "lora_path": "/etc"}, 400, "BadRequestError", "lora_path"),
    ("load-traversal-name", LOAD, {"lora_name": "../x", "lora_path": "{root}/a"}, 400, "BadRequestError", "lora_name"),
    (
        "load-traversal-path",
        LOAD,
        {"lora_name": "x", "lora_path": "{root}/../../x"},
        400,
        "BadRequestError",
        "lora_path",
    ),
    ("load-base-mismatch", LOAD, {"lora_name": "x", "lora_path": "{bad_base}"}, 400, "BadRequestError", "lora_path"),
    ("load-missing-folder", LOAD, {"lora_name": "x", "lora_path": "{root}/absent"}, 404, "NotFoundError", "lora_path"),
    ("load-already-loaded", LOAD, {"lora_name": "a", "lora_path": "{root}/a"}, 400, "BadRequestError", "lora_name"),
    ("load-base-name", LOAD, {"lora_name": BASE_ID, "lora_path": "{root}/a"}, 400, "BadRequestError", "lora_name"),
    ("load-missing-path", LOAD, {"lora_name": "x"}, 400, "BadRequestError", "lora_path"),
    ("unload-unknown", "/v1/unload_lora_adapter", {"lora_name": "ghost"}, 404, "NotFoundError", "lora_name"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type", "param"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_error_contract(server, adapter_dir, path, body, status, error_type, param):
    if isinstance(body, dict):
        text = (
            json.dumps(body).replace("{root}", str(adapter_dir)).replace("{bad_base}", _bad_base_adapter(adapter_dir))
        )
        body = text.encode()
    response = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == (error_type, param), error
    assert error["code"] == ("model_not_found" if error_type == "NotFoundError" and param == "model" else None), error
    assert error["message"]


def test_server_keeps_serving_after_errors(server, client):
    for _, path, body, *_ in BAD_REQUESTS[:6]:
        httpx.post(server.url + path, content=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert complete(client, "a", "still there?")
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics(server, client):
    complete(client, "a", "count me")
    client.chat.completions.create(model="b", messages=USER, max_tokens=3, stream=True).close()
    text = httpx.get(server.url + "/metrics").text
    assert re.search(r'lorafleet_requests_total\{model="a",route="/v1/completions",status="200"\} \d', text)
    assert re.search(r'lorafleet_requests_total\{model="none",route="/v1/completions",status="404"\}', text)
    assert re.search(r'lorafleet_time_to_first_token_seconds_count\{model="a"\} [1-9]', text)
    assert re.search(r'lorafleet_e2e_request_latency_seconds_count\{model="a"\} [1-9]', text)
    assert re.search(r'lorafleet_generation_tokens_total\{model="a"\} [1-9]', text)
    assert re.search(r'lorafleet_prompt_tokens_total\{model="a"\} [1-9]', text)
    assert "lorafleet_loaded_adapters 2.0" in text
    assert "lorafleet_queue_depth 0.0" in text and "vllm:num_requests_waiting 0.0" in text


def test_api_key(tiny_model_dir, adapter_dir):
    config = config_for(tiny_model_dir, adapter_dir, api_key="s3cret")
    with ServerThread(create_app(config)) as secured:
        assert httpx.get(secured.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = httpx.get(secured.url + "/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "AuthenticationError"
        assert httpx.get(secured.url + "/metrics").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{secured.url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{secured.url}/v1", api_key="s3cret", max_retries=0)
        assert complete(good, "a", "hi")
        assert ServingClient(secured.url, api_key="s3cret").adapters().keys() == {"a", "b"}


def test_queue_full_gives_429_with_retry_after(tiny_model_dir, adapter_dir):
    """One long request holds the only batch slot and one more may wait: every other request then gets a 429."""
    config = config_for(tiny_model_dir, adapter_dir, max_batch_size=1, max_queue=1, max_model_len=2048)
    config = config.model_copy(update={"max_tokens": 1500})
    with ServerThread(create_app(config)) as small:
        long = {"model": "a", "prompt": "x", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
        short = long | {"max_tokens": 4}

        async def running_requests(http: httpx.AsyncClient) -> float:
            lines = (await http.get("/metrics")).text.splitlines()
            return sum(float(line.split()[-1]) for line in lines if line.startswith("lorafleet_running_requests"))

        async def scenario():
            async with httpx.AsyncClient(base_url=small.url, timeout=120) as http:
                holding = asyncio.ensure_future(http.post(COMPLETIONS, json=long))
                while await running_requests(http) < 1:  # the slot is taken before the burst arrives
                    await asyncio.sleep(0.01)
                burst = await asyncio.gather(*(http.post(COMPLETIONS, json=short) for _ in range(7)))
                return [await holding, *burst]

        responses = asyncio.run(scenario())
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200] + [429] * 6, statuses  # the running one, the queued one, six refused
        rejected = [r for r in responses if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" for r in rejected)
        assert all(r.json()["error"]["type"] == "RateLimitError" for r in rejected)
        metrics = httpx.get(small.url + "/metrics").text
        assert f'lorafleet_rejected_requests_total{{reason="queue_full"}} {len(rejected)}.0' in metrics


def test_graceful_shutdown_finishes_streams(tiny_model_dir, adapter_dir):
    running = ServerThread(create_app(config_for(tiny_model_dir, adapter_dir))).start()
    streamed, errors = [], []

    def consume():
        try:
            body = {"model": "a", "prompt": "x", "max_tokens": 64, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", running.url + COMPLETIONS, json=body, timeout=60) as response:
                streamed.extend(line for line in response.iter_lines() if line)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 30
    while not streamed and time.monotonic() < deadline:
        time.sleep(0.01)
    running.stop()
    reader.join(30)
    assert not errors and streamed[-1] == "data: [DONE]"
    finish = json.loads(streamed[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
    assert finish == "length"


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~10-20 s
def test_cli_serve_starts_answers_and_stops_on_sigterm(tiny_model_dir, adapter_dir):
    port = free_port()
    command = [sys.executable, "-c", "from lorafleet.cli import main; main()", "serve", "--base", tiny_model_dir]
    command += ["--adapter", f"a={adapter_dir / 'a'}", "--port", str(port), "--served-model-name", BASE_ID]
    command += ["--max-batch-size", "2"]
    process = subprocess.Popen(command, cwd=REPO, env=os.environ.copy(), stderr=subprocess.PIPE, text=True)
    try:
        client = ServingClient(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while not client.health():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        assert client.adapters() == {"a": str(adapter_dir / "a")}
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        # the settings chosen for this machine, with the reason (conftest forces the CPU's bf16 verdict off)
        console = process.stderr.read()
        assert "dtype float32 (auto: LORAFLEET_CPU_BF16=0 " in console
        assert "max_batch_size 2 (set explicitly)" in console
    finally:
        if process.poll() is None:
            process.kill()


def test_cli_serve_refuses_bad_adapter_flag(tiny_model_dir):
    from tests.helpers import run_cli

    result = run_cli("serve", "--base", tiny_model_dir, "--adapter", "no-equals-sign")
    assert result.returncode == 2 and "expected NAME=PATH" in result.stderr
