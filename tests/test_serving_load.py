"""Load: 64 concurrent streaming chat clients (the official AsyncOpenAI, adapters mixed) for 30 s per phase,
against a real server on 127.0.0.1 (tiny model, two random adapters).

Phase 1, a small queue bound: the only failures are 429s with Retry-After, and only because the bound was hit
(each says so, the rejection counter matches, the sampled queue depth reached the bound and never passed it);
afterwards the server is healthy and answers; /metrics request and token counters equal what the clients saw.
Phase 2, a queue bound that holds all 64 clients: no errors at all.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.serving.app import create_app
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.server import ServerThread
from tests.helpers import BASE_ID, tiny_serving_config, two_adapters

MODELS = (BASE_ID, "a", "b")
CLIENTS = 64
DURATION_S = 30.0
BATCH = 8
CHAT = "/v1/chat/completions"


@dataclass
class Tally:
    """What the clients saw, by model: finished streams, their tokens, and (model, status) of refusals."""

    finished: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    retry_after: set = field(default_factory=set)
    messages: set = field(default_factory=set)
    unexpected: list = field(default_factory=list)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return two_adapters(tiny_model_dir, tmp_path_factory.mktemp("load-adapters"))


def _config(tiny_model_dir, adapter_dir, max_queue: int) -> ServingConfig:
    return tiny_serving_config(tiny_model_dir, adapter_dir, max_batch_size=BATCH, max_queue=max_queue, max_wait_ms=2)


async def _client(client: openai.AsyncOpenAI, index: int, deadline: float, tally: Tally) -> None:
    turn = 0
    while time.monotonic() < deadline:
        turn += 1
        model, max_tokens = MODELS[(index + turn) % len(MODELS)], 4 + (index * 7 + turn) % 13
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"client {index} turn {turn}"}],
                max_tokens=max_tokens,
                temperature=0.8,
                seed=index,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            finish, usage = None, None
            async for chunk in stream:
                usage = chunk.usage or usage
                if chunk.choices:
                    finish = chunk.choices[0].finish_reason or finish
            if finish != "length" or usage is None or usage.completion_tokens != max_tokens:
                tally.unexpected.append(f"{model}: finish {finish}, usage {usage}, wanted {max_tokens} tokens")
                continue
            tally.finished[model] += 1
            tally.tokens[model] += usage.completion_tokens
        except openai.APIStatusError as exc:
            if exc.status_code not in (429, 503):
                tally.unexpected.append(f"{model}: {exc.status_code} {exc.message}")
                continue
            retry_after = exc.response.headers.get("retry-after")
            tally.refused[(model, str(exc.status_code))] += 1
            tally.retry_after.add(retry_after)
            tally.messages.add(exc.body.get("message") if isinstance(exc.body, dict) else exc.message)
            await asyncio.sleep(float(retry_after or 0))  # a well-behaved client waits as told
        except Exception as exc:  # noqa: BLE001 - collected and reported by the test
            tally.unexpected.append(f"{model}: {type(exc).__name__}: {exc}")


async def _queue_depths(url: str, stop: asyncio.Event) -> list[float]:
    """Sample the server's queue-depth gauge every 50 ms until `stop`."""
    depths = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while not stop.is_set():
            depths.append(_samples((await http.get("/metrics")).text)[("lorafleet_queue_depth", ())])
            await asyncio.sleep(0.05)
    return depths


def _run_load(url: str) -> tuple[Tally, list[float]]:
    async def main():
        tally, stop = Tally(), asyncio.Event()
        sampler = asyncio.create_task(_queue_depths(url, stop))
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        async with client:
            deadline = time.monotonic() + DURATION_S
            await asyncio.gather(*(_client(client, index, deadline, tally) for index in range(CLIENTS)))
        stop.set()
        return tally, await sampler

    return asyncio.run(main())


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of a Prometheus text exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _server_counts(url: str) -> tuple[dict, dict, float]:
    """(model, status) -> chat requests, model -> generated tokens, queue_full rejections; from /metrics."""
    samples = _samples(httpx.get(url + "/metrics").text)
    requests, tokens, rejected = {}, {}, 0.0
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if name == "lorafleet_requests_total" and labels["route"] == CHAT:
            requests[(labels["model"], labels["status"])] = value
        elif name == "lorafleet_generation_tokens_total":
            tokens[labels["model"]] = value
        elif name == "lorafleet_rejected_requests_total" and labels["reason"] == "queue_full":
            rejected = value
    return requests, tokens, rejected


def _client_counts(tally: Tally) -> tuple[dict, dict, float]:
    requests = {(model, "200"): float(count) for model, count in tally.finished.items()}
    requests |= {key: float(count) for key, count in tally.refused.items()}
    tokens = {model: float(count) for model, count in tally.tokens.items()}
    return requests, tokens, float(sum(count for (_, status), count in tally.refused.items() if status == "429"))


def _assert_metrics_match(url: str, tally: Tally) -> None:
    # The server counts a streamed request when its response has ended, a moment after the client read [DONE].
    expected, deadline = _client_counts(tally), time.monotonic() + 10
    while (seen := _server_counts(url)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert seen == expected, f"/metrics {seen} != clients {expected}"


@pytest.mark.slow
def test_small_queue_bound_sheds_load_with_429_only(tiny_model_dir, adapter_dir):
    bound = 4
    with ServerThread(create_app(_config(tiny_model_dir, adapter_dir, max_queue=bound))) as server:
        tally, depths = _run_load(server.url)
        print(f"phase 1 (queue {bound}): finished {dict(tally.finished)}, refused {dict(tally.refused)}")

        assert not tally.unexpected, tally.unexpected[:10]
        assert sum(tally.finished.values()) >= CLIENTS
        assert {status for _, status in tally.refused} == {"429"}, tally.refused  # the server never stopped
        assert None not in tally.retry_after and tally.retry_after, tally.retry_after
        assert tally.messages == {f"the request queue is full ({bound} waiting); retry shortly"}, tally.messages
        assert max(depths) == bound, f"queue depth samples never reached the bound {bound}: max {max(depths)}"
        _assert_metrics_match(server.url, tally)

        assert httpx.get(server.url + "/health").status_code == 200
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "still there?"}], max_tokens=5, temperature=0
        )
        assert answer.choices[0].message.content and answer.usage.completion_tokens <= 5


@pytest.mark.slow
def test_queue_bound_for_every_client_means_no_errors(tiny_model_dir, adapter_dir):
    with ServerThread(create_app(_config(tiny_model_dir, adapter_dir, max_queue=CLIENTS))) as server:
        tally, depths = _run_load(server.url)
        print(f"phase 2 (queue {CLIENTS}): finished {dict(tally.finished)}, max queue depth {max(depths):.0f}")

        assert not tally.unexpected and not tally.refused, (tally.unexpected[:10], tally.refused)
        assert sum(tally.finished.values()) >= CLIENTS and set(tally.finished) == set(MODELS)
        assert max(depths) > BATCH, "the clients never had to wait: not a load test"
        _assert_metrics_match(server.url, tally)
