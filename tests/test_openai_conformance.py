"""Every response shape the server sends, checked against OpenAI's own published API description.

The schemas are in tests/data/openai_schemas.json: the component schemas of openapi.json from
github.com/openai/openai-openapi (commit and licence recorded in the file; regenerate with
tools/openai_schemas.py), validated as JSON Schema 2020-12, the dialect of OpenAPI 3.1. A real server on
127.0.0.1 serves the tiny model with two adapters, behind an API key.

One relaxation, documented in docs/serving.md: streamed completion chunks carry `finish_reason: null` until the
last one, as OpenAI's API and vLLM send them, while the spec's schema (shared with non-streamed responses) has
no null there.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx
import pytest
from jsonschema import Draft202012Validator

SCHEMAS = json.loads((Path(__file__).parent / "data" / "openai_schemas.json").read_text())
KEY = "conformance-key"


def with_nullable(node: object) -> object:
    """OpenAPI 3.0's `nullable: true` (the spec still uses it in places) as JSON Schema: the schema or null."""
    if isinstance(node, list):
        return [with_nullable(value) for value in node]
    if not isinstance(node, dict):
        return node
    converted = {key: with_nullable(value) for key, value in node.items() if key != "nullable"}
    return {"anyOf": [converted, {"type": "null"}]} if node.get("nullable") is True else converted


def validator(name: str, *, streamed_completion: bool = False) -> Draft202012Validator:
    document = with_nullable(copy.deepcopy(SCHEMAS))
    if streamed_completion:
        reason = document["components"]["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
        reason["properties"]["finish_reason"] = {"anyOf": [reason["properties"]["finish_reason"], {"type": "null"}]}
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": document["components"]})


def assert_conforms(body: object, name: str, **relax: bool) -> None:
    problems = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(name, **relax).iter_errors(body)
    ]
    assert problems == [], f"{name}: {problems}\n{json.dumps(body)[:2000]}"


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    from lorafleet.serving.app import create_app
    from lorafleet.serving.server import ServerThread
    from tests.helpers import tiny_serving_config, two_adapters

    root = two_adapters(tiny_model_dir, tmp_path_factory.mktemp("conformance"))
    config = tiny_serving_config(tiny_model_dir, root, max_tokens=8, api_key=KEY, max_request_bytes=4096)
    with ServerThread(create_app(config)) as server:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            yield http


def sse_chunks(response: httpx.Response) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", response.text[-500:]
    return [json.loads(line) for line in lines[:-1]]


def test_the_models_list_and_each_model_conform(client: httpx.Client) -> None:
    listed = client.get("/v1/models")
    assert listed.status_code == 200
    assert_conforms(listed.json(), "ListModelsResponse")
    assert {model["id"] for model in listed.json()["data"]} == {"tiny", "a", "b"}
    for model in listed.json()["data"]:
        assert_conforms(model, "Model")


COMPLETIONS = {
    "one prompt": {"model": "tiny", "prompt": "hello", "max_tokens": 4},
    "a list of one prompt, an adapter": {"model": "a", "prompt": ["hi there"], "max_tokens": 3, "temperature": 0.7},
    "token ids, a stop string": {"model": "b", "prompt": [1, 2, 3], "stop": ["\n"], "max_tokens": 5, "seed": 3},
    "three choices": {"model": "a", "prompt": "hello", "n": 3, "max_tokens": 4, "temperature": 1, "seed": 9},
}


@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_completions_conform(client: httpx.Client, case: str) -> None:
    answered = client.post("/v1/completions", json=COMPLETIONS[case])
    assert answered.status_code == 200, answered.text
    assert_conforms(answered.json(), "CreateCompletionResponse")


CHATS = {
    "one user turn": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "system + parts, an adapter": {
        "model": "a",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        ],
        "max_completion_tokens": 3,
    },
    "two choices": {"model": "b", "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3},
}


@pytest.mark.parametrize("case", list(CHATS))
def test_chat_completions_conform(client: httpx.Client, case: str) -> None:
    answered = client.post("/v1/chat/completions", json=CHATS[case])
    assert answered.status_code == 200, answered.text
    assert_conforms(answered.json(), "CreateChatCompletionResponse")


@pytest.mark.parametrize("usage", [False, True], ids=["plain", "include_usage"])
@pytest.mark.parametrize("n", [1, 3])
def test_every_completion_stream_chunk_conforms(client: httpx.Client, usage: bool, n: int) -> None:
    body = COMPLETIONS["a list of one prompt, an adapter"] | {"stream": True, "n": n}
    answered = client.post(
        "/v1/completions", json=body | ({"stream_options": {"include_usage": True}} if usage else {})
    )
    assert answered.status_code == 200 and answered.headers["content-type"].startswith("text/event-stream")
    chunks = sse_chunks(answered)
    for chunk in chunks:
        assert_conforms(chunk, "CreateCompletionResponse", streamed_completion=True)
    assert ("usage" in chunks[-1] and chunks[-1]["choices"] == []) is usage
    assert {choice["index"] for chunk in chunks for choice in chunk["choices"]} == set(range(n))


@pytest.mark.parametrize("usage", [False, True], ids=["plain", "include_usage"])
@pytest.mark.parametrize("n", [1, 2])
def test_every_chat_stream_chunk_conforms(client: httpx.Client, usage: bool, n: int) -> None:
    body = CHATS["system + parts, an adapter"] | {"stream": True, "n": n}
    answered = client.post(
        "/v1/chat/completions", json=body | ({"stream_options": {"include_usage": True}} if usage else {})
    )
    assert answered.status_code == 200
    chunks = sse_chunks(answered)
    for chunk in chunks:
        assert_conforms(chunk, "CreateChatCompletionStreamResponse")
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}
    assert ("usage" in chunks[-1] and chunks[-1]["choices"] == []) is usage
    assert {choice["index"] for chunk in chunks for choice in chunk["choices"]} == set(range(n))


ERRORS = {
    "no API key": ("POST", "/v1/completions", {"model": "tiny", "prompt": "x"}, {"Authorization": ""}, 401),
    "unknown model": ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, {}, 404),
    "unknown field": ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "bogus": 1}, {}, 400),
    "wrong type": ("POST", "/v1/chat/completions", {"model": "tiny", "messages": "hi"}, {}, 400),
    "not JSON": ("POST", "/v1/completions", b"{not json", {"Content-Type": "application/json"}, 400),
    "body too large": ("POST", "/v1/completions", {"model": "tiny", "prompt": "x" * 8000}, {}, 413),
    "max_tokens over the cap": ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 99}, {}, 400),
    "unknown route": ("GET", "/v1/nothing", None, {}, 404),
    "wrong method": ("GET", "/v1/completions", None, {}, 405),
    "bad adapter load": ("POST", "/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "/etc"}, {}, 400),
    "unload unknown": ("POST", "/v1/unload_lora_adapter", {"lora_name": "ghost"}, {}, 404),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_every_error_conforms(client: httpx.Client, case: str) -> None:
    method, path, body, headers, status = ERRORS[case]
    content = body if isinstance(body, bytes) else None
    answered = client.request(method, path, json=None if content else body, content=content, headers=headers)
    assert answered.status_code == status, answered.text
    assert_conforms(answered.json(), "ErrorResponse")
