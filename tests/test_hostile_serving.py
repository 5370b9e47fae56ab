"""Hostile or careless serving settings get a clear refusal (exit 2 naming the setting), never a weaker server."""

from __future__ import annotations

import pytest

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
def server(tiny_model_dir, tmp_path_factory):
    from lorafleet.serving.app import create_app
    from lorafleet.serving.server import ServerThread
    from tests.helpers import tiny_serving_config, two_adapters

    root = two_adapters(tiny_model_dir, tmp_path_factory.mktemp("hostile-adapters"))
    with ServerThread(create_app(tiny_serving_config(tiny_model_dir, root, max_tokens=8))) as running:
        yield running


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
