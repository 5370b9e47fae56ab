"""Hostile or careless serving settings get a clear refusal (exit 2 naming the setting), never a weaker server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import hostile_adapters
from tests.helpers import run_cli


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_empty_api_key_is_refused_not_treated_as_no_auth(how: str) -> None:
    args = ["serve", "--engine", "cpu", "--base", "builtin:tiny-llama", "--port", "0"]
    if how == "flag":
        result = run_cli(*args, "--api-key", "", timeout=120)
    else:
        result = run_cli(*args, timeout=120, env={"LORAFLEET_API_KEY": "  "})
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert "api_key" in result.stderr and "empty API key would turn authentication off" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def adapter_root(tiny_model_dir, tmp_path_factory) -> Path:
    """Adapters a and b, plus hostile folders: one linked out of the root, one whose weights link out, one empty."""
    from tests.helpers import two_adapters

    root = two_adapters(tiny_model_dir, tmp_path_factory.mktemp("hostile-adapters"))
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(root / "a", outside / "copy")
    os.symlink(outside / "copy", root / "linked-folder")
    shutil.copytree(root / "a", root / "linked-weights")
    (root / "linked-weights" / "adapter_model.safetensors").unlink()
    os.symlink(outside / "copy" / "adapter_model.safetensors", root / "linked-weights" / "adapter_model.safetensors")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_root):
    from lorafleet.serving.app import create_app
    from lorafleet.serving.server import ServerThread
    from tests.helpers import tiny_serving_config

    config = tiny_serving_config(tiny_model_dir, adapter_root, max_tokens=8, adapter_roots=[str(adapter_root)])
    with ServerThread(create_app(config)) as running:
        yield running


LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
# (route, body with {root}, status, param, words in the message)
ADMIN_CALLS = {
    "traversal out of the root": (LOAD, {"lora_name": "x", "lora_path": "{root}/../../etc"}, 400, "lora_path",
                                  "outside the allowed adapter roots"),
    "a folder linked out of the root": (LOAD, {"lora_name": "x", "lora_path": "{root}/linked-folder"}, 400,
                                        "lora_path", "outside the allowed adapter roots"),
    "weights linked out of the folder": (LOAD, {"lora_name": "x", "lora_path": "{root}/linked-weights"}, 400,
                                         "lora_path", "outside the adapter folder"),
    "not an adapter folder": (LOAD, {"lora_name": "x", "lora_path": "{root}/empty"}, 400, "lora_path",
                              "no adapter_config.json"),
    "a missing folder": (LOAD, {"lora_name": "x", "lora_path": "{root}/absent"}, 404, "lora_path", "does not exist"),
    "a trailing newline in the name": (LOAD, {"lora_name": "evil\n", "lora_path": "{root}/a"}, 400, "lora_name",
                                       "invalid"),
    "dots in the name": (LOAD, {"lora_name": "a..b", "lora_path": "{root}/a"}, 400, "lora_name", "invalid"),
    "a slash in the name": (LOAD, {"lora_name": "../a", "lora_path": "{root}/a"}, 400, "lora_name", "invalid"),
    "a 200-character name": (LOAD, {"lora_name": "a" * 200, "lora_path": "{root}/a"}, 400, "lora_name", "invalid"),
    "the base model's name": (LOAD, {"lora_name": "tiny", "lora_path": "{root}/a"}, 400, "lora_name",
                              "conflicts with the served base"),
    "already loaded": (LOAD, {"lora_name": "a", "lora_path": "{root}/a"}, 400, "lora_name", "already"),
    "an unknown field": (LOAD, {"lora_name": "x", "lora_path": "{root}/a", "trust_remote_code": True}, 400,
                         "trust_remote_code", "Unrecognized request argument"),
    "unload the base model": (UNLOAD, {"lora_name": "tiny"}, 404, "lora_name", "cannot be found"),
    "unload an unknown adapter": (UNLOAD, {"lora_name": "ghost"}, 404, "lora_name", "ghost"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ADMIN_CALLS))
def test_hostile_admin_calls_are_refused_and_nothing_is_loaded(server, adapter_root: Path, case: str) -> None:
    import httpx

    route, body, status, param, words = ADMIN_CALLS[case]
    body = json.loads(json.dumps(body).replace("{root}", str(adapter_root)))
    answered = httpx.post(server.url + route, json=body, timeout=60)
    assert answered.status_code == status, answered.text
    error = answered.json()["error"]
    assert error["param"] == param and words in error["message"], error
    listed = {model["id"] for model in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
    assert listed == {"tiny", "a", "b"}


LONE_SURROGATES = [
    ("/v1/completions", rb'{"model": "tiny", "prompt": "\udc00", "max_tokens": 2}', "prompt"),
    ("/v1/completions", rb'{"model": "a", "prompt": "ok", "stop": ["\ud800"], "max_tokens": 2}', "stop"),
    (
        "/v1/chat/completions",
        rb'{"model": "b", "messages": [{"role": "user", "content": "hi \udfff"}], "max_tokens": 2}',
        "messages",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), LONE_SURROGATES, ids=[case[2] for case in LONE_SURROGATES])
def test_a_lone_surrogate_is_a_400_and_the_connection_stays_usable(server, path: str, body: bytes, param: str):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as client:
        refused = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == param and "not valid Unicode" in error["message"], error
        fine = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
        assert fine.status_code == 200, fine.text


def _metric(url: str, name: str) -> float:
    import httpx

    lines = httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name) and not line.startswith("#"))


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_a_client_that_goes_away_stops_its_generation_and_frees_the_slot(tiny_model_dir, tmp_path, stream):
    import json
    import socket
    import time
    from urllib.parse import urlsplit

    from lorafleet.serving.app import create_app
    from lorafleet.serving.server import ServerThread
    from tests.helpers import tiny_serving_config, two_adapters

    wanted = 1900
    config = tiny_serving_config(tiny_model_dir, two_adapters(tiny_model_dir, tmp_path), max_model_len=2048)
    config = config.model_copy(update={"max_tokens": wanted})
    with ServerThread(create_app(config)) as server:
        body = json.dumps(
            {"model": "tiny", "prompt": "hello", "max_tokens": wanted, "ignore_eos": True, "stream": stream}
        ).encode()
        where = urlsplit(server.url)
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        client = socket.create_connection((where.hostname, where.port))
        client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while _metric(server.url, "lorafleet_running_requests") < 1:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
        client.close()
        while _metric(server.url, "lorafleet_running_requests") > 0:
            assert time.monotonic() < deadline + 30, "the request kept its slot after the client left"
            time.sleep(0.01)
        generated = _metric(server.url, "lorafleet_generation_tokens_total")
        assert generated < wanted / 2, f"{generated} of {wanted} tokens generated for a client that was gone"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
KNOWN_KEYS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
    "stream", "stream_options", "stop", "seed", "logit_bias", "logprobs", "echo", "response_format", "tools",
    "lora_name", "lora_path", "ignore_eos", "frequency_penalty", "presence_penalty", "user", "best_of",
]  # fmt: skip
ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"]
PLAUSIBLE = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "a", "b", "", "nope"]) | st.text(max_size=8)},
    optional={key: JSON for key in KNOWN_KEYS if key != "model"},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=PLAUSIBLE | JSON)
def test_no_json_body_makes_the_server_fail(server, route, body) -> None:
    """Any JSON at all, and bodies made of the real keys with any values: a 2xx or a 4xx, never a 5xx."""
    import httpx

    content = json.dumps(body, allow_nan=True).encode()
    answered = httpx.post(server.url + route, content=content, headers={"Content-Type": "application/json"}, timeout=60)
    assert answered.status_code < 500, (answered.status_code, answered.text[:500], body)
    if answered.status_code >= 400:
        error = answered.json()["error"]
        assert isinstance(error["message"], str) and error["message"], error
    elif route == "/v1/load_lora_adapter":
        pytest.fail(f"a random body loaded an adapter: {body}")


REFUSED_AT_LOAD = {
    case: change for case, change in {**hostile_adapters.SHARED, **hostile_adapters.WEIGHTS}.items()
    if case != "NaN in lora_B"  # loads (a header read cannot see it); its requests fail alone: test_serving_engine
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED_AT_LOAD))
def test_a_hostile_adapter_folder_is_a_400_and_every_model_still_answers(server, adapter_root: Path, case: str):
    """A FIFO never wedges a worker thread, a NaN/huge alpha never reaches the stacked LoRA, a JSON list, deep
    nesting or a 5000-digit integer is a 400 naming the file, not a 500."""
    import httpx

    folder = adapter_root / f"hostile-{list(REFUSED_AT_LOAD).index(case)}"
    shutil.copytree(adapter_root / "a", folder)
    words = REFUSED_AT_LOAD[case](folder)
    answered = httpx.post(f"{server.url}{LOAD}", json={"lora_name": "hostile", "lora_path": str(folder)}, timeout=30)
    assert answered.status_code == 400, answered.text
    error = answered.json()["error"]
    assert error["param"] == "lora_path" and words in error["message"], error
    listed = {model["id"] for model in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
    assert listed == {"tiny", "a", "b"}
    for model in ("tiny", "a", "b"):
        fine = httpx.post(
            f"{server.url}/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 2}, timeout=60
        )
        assert fine.status_code == 200, fine.text


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [("text/plain", "'text/plain'"), ("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),
     (None, "no Content-Type")],
)  # fmt: skip
def test_a_body_that_is_not_sent_as_json_is_a_415_naming_its_content_type(server, content_type, shown) -> None:
    import httpx

    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
    answered = httpx.post(f"{server.url}/v1/completions", content=body, headers=headers, timeout=30)
    assert answered.status_code == 415, answered.text
    assert shown in answered.json()["error"]["message"] and "application/json" in answered.json()["error"]["message"]
    fine = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert fine.status_code == 200, fine.text


@pytest.mark.parametrize("prompt", [[True, False], [[True]], [1, False]])
def test_json_booleans_are_not_token_ids(server, prompt) -> None:
    import httpx

    answered = httpx.post(
        f"{server.url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2}, timeout=30
    )
    assert answered.status_code == 400, answered.text
    assert answered.json()["error"]["param"] == "prompt"


def test_a_client_that_sends_its_body_too_slowly_gets_a_408_and_frees_the_connection(tiny_model_dir, tmp_path):
    import socket

    import httpx

    from lorafleet.serving.app import create_app
    from lorafleet.serving.server import ServerThread
    from tests.helpers import tiny_serving_config, two_adapters

    config = tiny_serving_config(tiny_model_dir, two_adapters(tiny_model_dir, tmp_path), request_body_timeout_s=1)
    with ServerThread(create_app(config)) as running, socket.create_connection((running.host, running.port)) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")  # fmt: skip
        slow.settimeout(10)
        answer = b""
        while chunk := slow.recv(4096):  # nothing more is ever sent; the server answers and closes
            answer += chunk
        answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "did not arrive within 1s" in answer
        fine = httpx.post(f"{running.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert fine.status_code == 200


ADAPTER_KEYS = [
    "r", "lora_alpha", "peft_type", "target_modules", "rank_pattern", "alpha_pattern", "use_dora",
    "base_model_name_or_path", "fan_in_fan_out", "bias", "modules_to_save", "num_virtual_tokens",
]  # fmt: skip
NUMBERS = st.integers(-(10**30), 10**30) | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [0, -1, 1e308, -1e308, 1e-320, 2**63, 65537, True, False]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(ADAPTER_KEYS), value=NUMBERS | JSON, raw=st.sampled_from([None, "NaN", "1e999"]))
def test_any_adapter_config_value_is_answered_below_500_and_every_model_still_answers(
    server, adapter_root, key, value, raw
):
    """Adapter `a` with one key set to any JSON value (or a non-JSON number): the load is answered below 500, and
    the base and the adapters already loaded answer exactly as before."""
    import httpx

    folder = adapter_root / "property"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(adapter_root / "a", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    text = json.dumps(config | {key: "RAW" if raw else value}, allow_nan=True)
    (folder / "adapter_config.json").write_text(text.replace('"RAW"', raw) if raw else text)
    loaded = httpx.post(f"{server.url}{LOAD}", json={"lora_name": "property", "lora_path": str(folder)}, timeout=60)
    assert loaded.status_code < 500, (loaded.status_code, loaded.text[:500])
    body = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    if loaded.status_code == 200:
        tried = httpx.post(f"{server.url}/v1/completions", json=body | {"model": "property"}, timeout=60)
        assert tried.status_code < 500 or "non-finite" in tried.text, (tried.status_code, tried.text[:500])
        httpx.post(f"{server.url}{UNLOAD}", json={"lora_name": "property"}, timeout=60)
    for model in ("tiny", "a", "b"):
        answered = httpx.post(f"{server.url}/v1/completions", json=body | {"model": model}, timeout=60)
        assert answered.status_code == 200, answered.text
        assert answered.json()["choices"][0]["text"] == _alone(server, model)


_ALONE: dict[tuple[str, str], str] = {}


def _alone(server, model: str) -> str:
    import httpx

    if (server.url, model) not in _ALONE:
        body = {"model": model, "prompt": "Hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        _ALONE[server.url, model] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()[
            "choices"
        ][0]["text"]
    return _ALONE[server.url, model]


SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "temperature": NUMBERS | JSON, "top_p": NUMBERS | JSON, "top_k": NUMBERS | JSON, "seed": NUMBERS | JSON,
        "max_tokens": NUMBERS | JSON, "stop": JSON, "n": NUMBERS, "ignore_eos": JSON,
    },
)  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(["tiny", "a", "b"]), sampling=SAMPLING)
def test_any_sampling_parameters_get_below_500_and_the_batch_beside_them_answers_as_alone(server, model, sampling):
    """A request with any sampling values runs in the same batch as greedy requests for every model: it gets a
    2xx or a 4xx, and each greedy request answers exactly what it answers alone."""
    import asyncio

    import httpx

    expected = {name: _alone(server, name) for name in ("tiny", "a", "b")}
    odd = {"model": model, "prompt": "Hello there", **sampling}
    greedy = [{"model": name, "prompt": "Hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
              for name in expected]  # fmt: skip

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            json_headers = {"Content-Type": "application/json"}
            calls = [
                client.post("/v1/completions", content=json.dumps(body, allow_nan=True), headers=json_headers)
                for body in [odd, *greedy]
            ]
            return await asyncio.gather(*calls)

    answers = asyncio.run(together())
    assert answers[0].status_code < 500, (answers[0].status_code, answers[0].text[:500], sampling)
    for body, answer in zip(greedy, answers[1:], strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == expected[body["model"]], (sampling, body["model"])
