"""`lorafleet sync` against real CPU servers on 127.0.0.1, a real registry on tmp storage, the official `openai` client.

Two replicas serve the tiny model. Each also serves `ref1`..`ref3` (the source adapters, loaded at startup from
outside the registry): what each version answers alone, and adapters sync must never touch. Every test gets a
fresh registry; the servers are emptied of registry adapters after each test.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import openai
import pytest
from safetensors.torch import load_file, save_file

from lorafleet.registry import promote, publish_adapter, rollback, unpublish
from lorafleet.registry.manifest import read_manifest
from lorafleet.serving.app import create_app
from lorafleet.serving.client import ServingClient
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.server import ServerThread
from lorafleet.serving.sync import Syncer
from lorafleet.serving.sync_config import SyncConfig, parse_duration
from lorafleet.serving.testing import make_adapter
from tests.helpers import run_cli

BASE_ID = "tiny"
PROMPT = "The quick brown fox"
REFS = {"ref1": 1, "ref2": 2, "ref3": 3}


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory):
    """Adapter folders made like training makes them: three good ones and one with NaN weights (a diverged run)."""
    root = tmp_path_factory.mktemp("sync-sources")
    folders = {name: make_adapter(tiny_model_dir, root / name, "lora", seed=seed) for name, seed in REFS.items()}
    broken = root / "nan"
    shutil.copytree(folders["ref1"], broken)
    weights = load_file(str(broken / "adapter_model.safetensors"))
    nan_weights = {key: tensor * float("nan") for key, tensor in weights.items()}
    save_file(nan_weights, str(broken / "adapter_model.safetensors"))
    folders["nan"] = broken
    return folders


@pytest.fixture(scope="module")
def servers(tiny_model_dir, sources, tmp_path_factory):
    config = ServingConfig(
        base=tiny_model_dir,
        served_model_name=BASE_ID,
        adapters={name: str(sources[name]) for name in REFS},
        adapter_roots=[str(tmp_path_factory.getbasetemp())],
        max_model_len=128,
        max_tokens=16,
        drain_timeout_s=5,
        torch_threads=1,
    )
    with ServerThread(create_app(config)) as one, ServerThread(create_app(config)) as two:
        yield [one, two]


@pytest.fixture
def storage(tmp_path, servers):
    yield str(tmp_path / "storage")
    for server in servers:  # leave only the startup adapters for the next test
        with ServingClient(server.url) as admin:
            for name in set(admin.adapters()) - set(REFS):
                admin.unload_adapter(name)


def complete(url: str, model: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    result = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    return result.choices[0].text


def loaded(url: str) -> dict[str, str | None]:
    with ServingClient(url) as admin:
        return admin.adapters()


def syncer(storage, servers, adapters=None, **changes) -> Syncer:
    values = {"storage": storage, "targets": [s.url for s in servers], "adapters": adapters, "backoff_s": 0.05}
    return Syncer(SyncConfig(**{**values, **changes}))


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "sync did not converge in time"
        time.sleep(0.1)


@pytest.mark.parametrize(
    "text,seconds", [("30s", 30), ("5m", 300), ("1m30s", 90), ("1h", 3600), ("250ms", 0.25), ("45", 45), ("2.5", 2.5)]
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "-5", "30x", "s", "1m 30s", "5mm"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_config_names_bad_references_targets_and_duplicates(tmp_path):
    with pytest.raises(ValueError, match="invalid reference"):
        SyncConfig(storage=str(tmp_path), targets=["http://127.0.0.1:1"], adapters=["price@V2"])
    with pytest.raises(ValueError, match="not a server URL"):
        SyncConfig(storage=str(tmp_path), targets=["127.0.0.1:8000"])
    with pytest.raises(ValueError, match="both be served as 'price'"):
        SyncConfig(storage=str(tmp_path), targets=["http://127.0.0.1:1"], adapters=["price@prod", "price@v2"])
    result = run_cli("sync", "--storage", str(tmp_path), "--target", "http://x:1", "--adapters", "Bad/Name", "--once")
    assert result.returncode == 2 and "--adapters" in result.stderr and "invalid registry name" in result.stderr


def test_cli_once_loads_a_new_version_on_both_replicas_and_is_idempotent(storage, servers, sources):
    publish_adapter(storage, "price", sources["ref1"])
    argv = ["sync", "--storage", storage, "--adapters", "price", "--once"]
    for server in servers:
        argv += ["--target", server.url]
    first = run_cli(*argv)
    assert first.returncode == 0, first.stderr
    for server in servers:
        assert f"loaded price@v1 as price.v1 on {server.url}" in first.stderr
        assert f"loaded price@v1 as price on {server.url}" in first.stderr
        assert set(loaded(server.url)) == {"price", *REFS}  # the staging name is gone again
        assert complete(server.url, "price") == complete(server.url, "ref1")

    publish_adapter(storage, "price", sources["ref2"])  # latest moves to v2
    second = run_cli(*argv)
    assert second.returncode == 0, second.stderr
    assert "loaded price@v2 as price on" in second.stderr and "(was v1)" in second.stderr
    for server in servers:
        assert complete(server.url, "price") == complete(server.url, "ref2") != complete(server.url, "ref1")

    third = run_cli(*argv)
    assert third.returncode == 0 and "converged: 0 change(s) on 2 target(s)" in third.stderr
    assert "loaded" not in third.stderr


def test_loop_follows_promote_and_rollback_without_a_failed_request(storage, servers, sources):
    for name in ("ref1", "ref2"):
        publish_adapter(storage, "price", sources[name])
    promote(storage, "price", "v1")
    want = {ref: complete(servers[0].url, ref) for ref in ("ref1", "ref2")}
    stop = threading.Event()
    loop = syncer(storage, servers, ["price@prod"], interval_s="200ms")
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    answers, failures = [], []

    def clients_keep_asking() -> None:
        while not stop.is_set():
            try:
                answers.append(complete(servers[0].url, "price"))
            except openai.NotFoundError:
                if answers:  # before the first load a 404 is expected; after it, never
                    failures.append("404 after price was loaded")
            except openai.APIError as exc:
                failures.append(repr(exc))

    asker = threading.Thread(target=clients_keep_asking, daemon=True)
    asker.start()
    try:
        for server in servers:
            wait_until(lambda url=server.url: "price" in loaded(url) and complete(url, "price") == want["ref1"])
        promote(storage, "price", "v2")
        for server in servers:
            wait_until(lambda url=server.url: complete(url, "price") == want["ref2"])
        rollback(storage, "price")
        for server in servers:
            wait_until(lambda url=server.url: complete(url, "price") == want["ref1"])
    finally:
        stop.set()
        thread.join(30)
        asker.join(30)
        loop.close()
    assert not failures
    assert set(answers) <= {want["ref1"], want["ref2"]} and want["ref2"] in answers  # old or new, never half
    assert all(set(loaded(server.url)) == {"price", *REFS} for server in servers)


def test_unpublished_and_unwanted_names_are_unloaded_and_others_kept(storage, servers, sources):
    publish_adapter(storage, "price", sources["ref1"])
    publish_adapter(storage, "support", sources["ref2"])
    every_name = syncer(storage, servers)  # no adapters given: every published name at latest
    assert every_name.reconcile().converged
    assert all(set(loaded(server.url)) == {"price", "support", *REFS} for server in servers)

    unpublish(storage, "support@v1")
    report = every_name.reconcile()
    assert report.converged and sum("unloaded support" in change for change in report.changes) == 2
    for server in servers:
        assert set(loaded(server.url)) == {"price", *REFS}  # the startup adapters and the base are not sync's
        assert BASE_ID in {card.id for card in ServingClient(server.url).models().data}

    only_price = syncer(storage, servers, ["price@v1"])
    publish_adapter(storage, "support", sources["ref3"])
    assert only_price.reconcile().converged and all("support" not in loaded(s.url) for s in servers)
    assert every_name.reconcile().converged and all("support" in loaded(s.url) for s in servers)
    assert syncer(storage, servers, ["price"]).reconcile().converged  # a narrower set: support is not wanted now
    assert all("support" not in loaded(server.url) for server in servers)
    assert every_name.reconcile().changes and only_price.reconcile().changes  # each converges to its own set


def test_an_alias_naming_a_missing_version_keeps_serving_what_it_serves(storage, servers, sources):
    """A half-copied registry or a hand edit: `prod` names v7, which is not there. The name stays loaded, and
    the error is in the report (and the log); a name that is not published at all is still unloaded."""
    from lorafleet.registry import Registry
    from lorafleet.registry.aliases import read_aliases

    publish_adapter(storage, "price", sources["ref1"])
    promote(storage, "price", "v1")
    once = syncer(storage, servers, ["price@prod"])
    assert once.reconcile().converged
    aliases_file = Path(storage) / "adapters" / "price" / "aliases.json"
    aliases_file.write_text(aliases_file.read_text().replace('"prod": "v1"', '"prod": "v7"'))
    assert read_aliases(Registry.open(storage), "price").aliases["prod"] == "v7"
    for _ in range(2):  # and again: nothing changes while the alias stays broken
        report = once.reconcile()
        assert not report.converged and not report.changes
        assert any("points at v7, which no longer exists" in error and "keeps what it serves" in error
                   for error in report.errors), report.errors  # fmt: skip
    for server in servers:
        assert loaded(server.url)["price"].endswith("/price/v1")
        assert complete(server.url, "price") == complete(server.url, "ref1")


def test_a_down_target_does_not_stop_the_others(storage, servers, sources):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    publish_adapter(storage, "price", sources["ref1"])
    report = syncer(storage, [servers[0]], ["price"], targets=[dead, servers[0].url]).reconcile()
    assert not report.converged and report.errors[0].startswith(f"{dead}: cannot list adapters")
    assert complete(servers[0].url, "price") == complete(servers[0].url, "ref1")

    result = run_cli("sync", "--storage", storage, "--target", dead, "--target", servers[1].url, "--once")
    assert result.returncode == 1 and f"{dead}: cannot list adapters" in result.stderr
    assert f"loaded price@v1 as price on {servers[1].url}" in result.stderr
    assert complete(servers[1].url, "price") == complete(servers[1].url, "ref1")


def test_a_failing_probe_keeps_the_old_version(storage, servers, sources, monkeypatch):
    publish_adapter(storage, "price", sources["ref1"])
    promote(storage, "price", "v1")
    once = syncer(storage, servers, ["price@prod"], retries=1)
    assert once.reconcile().converged
    # Publish refuses NaN weights now; a registry written before that check can still hold such a version.
    monkeypatch.setattr("lorafleet.registry.publish.check_finite_weights", lambda path: None)
    publish_adapter(storage, "price", sources["nan"])  # loads fine, cannot generate
    monkeypatch.undo()
    promote(storage, "price", "v2")
    report = once.reconcile()
    assert not report.converged and len(report.errors) == 2
    assert all("the probe of price.v2 failed" in error and "price keeps serving v1" in error for error in report.errors)
    for server in servers:
        assert set(loaded(server.url)) == {"price", *REFS}
        assert loaded(server.url)["price"].endswith("/price/v1")
        assert complete(server.url, "price") == complete(server.url, "ref1")

    result = run_cli("sync", "--storage", storage, "--target", servers[0].url, "--adapters", "price@prod", "--once")
    assert result.returncode == 1 and "the probe of price.v2 failed" in result.stderr
    assert "not converged" in result.stderr


# ---- routing aliases: every version under its own name (what vLLM's name-keyed prefix cache needs) ------------


class RecordingClient(ServingClient):
    """The sync's own client, recording every load and unload it sends (name, folder)."""

    calls: list[tuple[str, str, str | None]] = []

    def load_adapter(self, name: str, path: str, *, load_inplace: bool = False) -> str:
        self.calls.append(("load" + ("_inplace" if load_inplace else ""), name, path))
        return super().load_adapter(name, path, load_inplace=load_inplace)

    def unload_adapter(self, name: str) -> str:
        self.calls.append(("unload", name, None))
        return super().unload_adapter(name)


def test_routed_sync_never_reuses_a_name_for_other_weights_and_the_router_follows_the_alias(
    storage, servers, sources, monkeypatch
):
    from lorafleet.registry import Registry
    from lorafleet.serving.alias_router import create_router

    monkeypatch.setattr("lorafleet.serving.sync.ServingClient", RecordingClient)
    RecordingClient.calls = []
    for name in ("ref1", "ref2", "ref3"):
        publish_adapter(storage, "price", sources[name])
    promote(storage, "price", "v1")
    want = {ref: complete(servers[0].url, ref) for ref in REFS}
    routed = syncer(storage, [servers[0]], ["price@prod"], route=True)
    with ServerThread(create_router(servers[0].url, routed.aliases)) as router:
        steps = [("v1", "ref1"), ("v2", "ref2"), ("v1", "ref1"), ("v3", "ref3")]  # promote, rollback, promote
        for version, ref in steps:
            promote(storage, "price", version)
            report = routed.reconcile()
            assert report.converged, report.errors
            assert complete(router.url, "price") == want[ref]  # the official client, asking for the alias
            served = routed.aliases.get("price")
            assert served.startswith(f"price.{version}-") and set(loaded(servers[0].url)) == {served, *REFS}
            models = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused").models.list()
            assert {"price", served} <= {card.id for card in models.data}
        assert routed.reconcile().changes == [], "a converged pass sends nothing"
        stream = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused").completions.create(
            model="price", prompt=PROMPT, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == want["ref3"]  # streamed through
    routed.close()

    weights_of: dict[str, str] = {}
    for call, name, path in RecordingClient.calls:
        assert call != "load_inplace", "routing never replaces the weights behind a name"
        if call == "load":
            version_dir = Registry.open(storage).version_dir("price", path.rsplit("/", 1)[-1])
            digest = "".join(sorted(f.sha256 for f in read_manifest(version_dir).files.values()))
            assert weights_of.setdefault(name, digest) == digest, f"{name} was loaded with other weights"
    assert len(weights_of) == 3 and "price" not in weights_of
    assert [call for call, *_ in RecordingClient.calls].count("unload") == 3  # each old version, after the switch


def test_routing_needs_exactly_one_target(tmp_path):
    with pytest.raises(ValueError, match="exactly one --target"):
        SyncConfig(storage=str(tmp_path), targets=["http://a:1", "http://b:1"], route=True)
    result = run_cli(
        "sync", "--storage", str(tmp_path), "--target", "http://a:1", "--target", "http://b:1", "--route-port", "0"
    )
    assert result.returncode == 2 and "--target" in result.stderr and "exactly one" in result.stderr
