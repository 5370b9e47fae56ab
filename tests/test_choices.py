"""`n` choices on the OpenAI routes: one prefill of the prompt, then n sampling streams.

A real server on 127.0.0.1 (tiny model, adapters a and b) hit with the official `openai` client. Choice i of a
seeded request equals a single request seeded seed + i (vLLM's rule); the engine counts prompts run through the
model, so the shared prefill is seen, not assumed.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from lorafleet.serving.app import create_app
from lorafleet.serving.server import ServerThread
from tests.helpers import tiny_serving_config, two_adapters

USER = [{"role": "user", "content": "name a number"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = two_adapters(tiny_model_dir, tmp_path_factory.mktemp("choices"))
    config = tiny_serving_config(tiny_model_dir, root, max_batch_size=8, max_n=6, max_wait_ms=50)
    with ServerThread(create_app(config)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


SAMPLED = {"max_tokens": 8, "temperature": 1.0, "extra_body": {"ignore_eos": True}}


@pytest.mark.parametrize("model", ["tiny", "a"])
def test_each_completion_choice_equals_a_single_request_with_the_derived_seed(client, model) -> None:
    answer = client.completions.create(model=model, prompt="Once upon", n=4, seed=11, **SAMPLED)
    assert [choice.index for choice in answer.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(model=model, prompt="Once upon", seed=11 + i, **SAMPLED) for i in range(4)]
    assert [choice.text for choice in answer.choices] == [single.choices[0].text for single in alone]
    assert len({choice.text for choice in answer.choices}) > 1, "four sampled choices came out identical"
    assert answer.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert answer.usage.completion_tokens == sum(single.usage.completion_tokens for single in alone) == 32


def test_chat_choices_are_reproducible_with_a_seed(client) -> None:
    first = client.chat.completions.create(model="b", messages=USER, n=3, seed=-2, **SAMPLED)
    again = client.chat.completions.create(model="b", messages=USER, n=3, seed=-2, **SAMPLED)
    texts = [choice.message.content for choice in first.choices]
    assert texts == [choice.message.content for choice in again.choices]
    single = client.chat.completions.create(model="b", messages=USER, seed=-1, **SAMPLED)
    assert texts[1] == single.choices[0].message.content


def test_n_choices_run_their_prompt_once(server, client) -> None:
    engine = server.app.state.engine
    before = engine.stats().prefilled_rows
    client.completions.create(model="a", prompt="a prompt that is prefilled once", n=5, seed=1, **SAMPLED)
    assert engine.stats().prefilled_rows - before == 1
    before = engine.stats().prefilled_rows
    for i in range(2):
        client.completions.create(model="a", prompt=f"two different prompts {i}", seed=1, **SAMPLED)
    assert engine.stats().prefilled_rows - before == 2


def test_choices_share_a_batch_with_other_requests_and_answer_as_alone(server, client) -> None:
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as aclient:
            jobs = [aclient.completions.create(model="a", prompt="shared batch", n=3, seed=7, **SAMPLED)]
            jobs += [aclient.completions.create(model=m, prompt=f"other {m}", seed=3, **SAMPLED) for m in "ab"]
            return await asyncio.gather(*jobs)

    together = asyncio.run(main())
    alone = client.completions.create(model="a", prompt="shared batch", n=3, seed=7, **SAMPLED)
    assert [c.text for c in together[0].choices] == [c.text for c in alone.choices]
    for answer, model in zip(together[1:], "ab", strict=True):
        again = client.completions.create(model=model, prompt=f"other {model}", seed=3, **SAMPLED)
        assert answer.choices[0].text == again.choices[0].text


def test_streamed_choices_carry_their_index_and_equal_the_unstreamed_answer(server, client) -> None:
    body = {"model": "a", "prompt": "stream me", "n": 3, "seed": 4, "max_tokens": 6, "temperature": 1,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    answered = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    lines = [line.removeprefix("data: ") for line in answered.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    texts, finished = ["", "", ""], set()
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert finished == {0, 1, 2}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 18
    plain = client.completions.create(model="a", prompt="stream me", n=3, seed=4, max_tokens=6, temperature=1,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    assert texts == [choice.text for choice in plain.choices]


@pytest.mark.parametrize("n", [7, 129, 0])
def test_n_beyond_the_limit_is_a_400_naming_n(server, n) -> None:
    body = {"model": "a", "prompt": "x", "n": n}
    answered = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert answered.status_code == 400 and answered.json()["error"]["param"] == "n", answered.text
