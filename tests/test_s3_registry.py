"""The registry on `s3://`, in process, against a local S3-compatible server (moto's standalone server: an emulator
of the S3 API, not AWS; tests/s3_server.py). The whole loop through the CLI is in tests/test_s3.py.

Concurrent publishers get distinct versions; unpublish never frees a number; a policy set from one machine gates
promotions made from another (a second, empty mirror); a file changed on the store after publishing is caught
by `verify` and refused by `resolve`; compose reads and writes the object store; of two interleaved alias edits
from two machines the second loses the conditional write and changes nothing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lorafleet.registry import (
    RegistryError,
    compose_adapters,
    list_entries,
    promote,
    publish_adapter,
    resolve,
    set_policy,
    unpublish,
    verify,
)
from lorafleet.registry.verify import TamperedVersion
from tests.s3_server import S3Server, start_s3_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Server:
    server = start_s3_server(tmp_path_factory.mktemp("moto-registry"), bucket="registry-test")
    yield server
    server.stop()


@pytest.fixture
def on_s3(s3: S3Server, tmp_path: Path, monkeypatch) -> str:
    """This process talks to the server as the writer; the mirror lives in this test's own LORAFLEET_HOME."""
    from lorafleet import object_store

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    object_store.client.cache_clear()
    yield f"s3://{s3.bucket}/{tmp_path.name}"
    object_store.client.cache_clear()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    from lorafleet.serving.testing import make_adapter

    root = tmp_path_factory.mktemp("s3-adapters")
    return {name: make_adapter(tiny_model_dir, root / name, "lora", seed=seed) for name, seed in (("a", 1), ("b", 2))}


def test_concurrent_publishers_get_distinct_versions_and_numbers_are_never_reused(on_s3: str, adapters) -> None:
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda _: publish_adapter(on_s3, "price", adapters["a"]).version, range(4)))
    assert sorted(versions) == ["v1", "v2", "v3", "v4"]
    (entry,) = list_entries(on_s3, "price")
    assert entry.versions == ["v1", "v2", "v3", "v4"] and entry.aliases["latest"] == "v4"
    assert unpublish(on_s3, "price@v4") == "v4"
    assert list_entries(on_s3, "price")[0].versions == ["v1", "v2", "v3"]
    assert publish_adapter(on_s3, "price", adapters["b"]).version == "v5"  # v4's number stays retired
    assert verify(on_s3).ok


def test_a_policy_set_elsewhere_gates_promotions_from_another_mirror(on_s3: str, adapters, tmp_path, monkeypatch):
    publish_adapter(on_s3, "gated", adapters["a"], metrics={"mae": 50.0})
    set_policy(on_s3, "gated", ["thresholds.mae.max=10"])
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "another-machine"))
    with pytest.raises(RegistryError, match="mae"):
        promote(on_s3, "gated", "v1", alias="prod")
    moved = promote(on_s3, "gated", "v1", alias="prod", force=True, reason="known regression")
    assert moved.version == "v1" and list_entries(on_s3, "gated")[0].aliases["prod"] == "v1"


def test_a_file_changed_on_the_store_is_caught_and_refused(on_s3: str, s3: S3Server, adapters) -> None:
    publish_adapter(on_s3, "tampered", adapters["a"])
    prefix = on_s3.split("/", 3)[3]
    key = f"{prefix}/adapters/tampered/v1/adapter_config.json"
    body = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=body.replace(b'"r": 8', b'"r": 9'))
    report = verify(on_s3)
    assert not report.ok and any("adapter_config.json" in str(problem) for problem in report.problems)
    with pytest.raises(TamperedVersion):
        resolve(on_s3, "tampered@v1")


def test_compose_reads_its_parents_from_and_publishes_to_the_store(on_s3: str, s3: S3Server, adapters) -> None:
    publish_adapter(on_s3, "left", adapters["a"])
    publish_adapter(on_s3, "right", adapters["b"])
    composed = compose_adapters(on_s3, ["left@v1", "right@v1"], [0.5, 0.5], name="both")
    assert composed.version == "v1" and composed.manifest.parents == ["left@v1", "right@v1"]
    prefix = on_s3.split("/", 3)[3]
    assert f"{prefix}/adapters/both/v1/manifest.json" in s3.keys_under(f"{prefix}/adapters/both/")
    assert resolve(on_s3, "both").manifest.files == composed.manifest.files


def test_of_two_interleaved_alias_edits_the_second_writer_loses_and_writes_nothing(on_s3: str, s3, adapters, tmp_path):
    """Two machines (two mirrors) read aliases.json, both change it; the first write wins, the second is refused
    by the store (If-Match) and changes nothing, and a promote that loses says to run it again."""
    from lorafleet.object_store import PreconditionFailed
    from lorafleet.registry.remote import RemoteRegistry

    publish_adapter(on_s3, "raced", adapters["a"])
    first, second = RemoteRegistry(on_s3), RemoteRegistry(on_s3)
    first.mirror, second.mirror = tmp_path / "machine-1", tmp_path / "machine-2"
    with pytest.raises(PreconditionFailed, match="run it again"):
        with first.editing_aliases("adapters", "raced") as mine:
            with second.editing_aliases("adapters", "raced") as theirs:
                theirs.write_text('{"aliases": {"prod": "v1"}, "history": []}')
            mine.write_text('{"aliases": {"canary": "v1"}, "history": []}')
    key = f"{on_s3.split('/', 3)[3]}/adapters/raced/aliases.json"
    stored = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    assert b'"prod"' in stored and b"canary" not in stored
    assert b"canary" not in (first.mirror / "adapters" / "raced" / "aliases.json").read_bytes()  # back in step
