"""Hostile adapter folders at publish and at load: links out of the folder, truncated or corrupt files.

Each case: the exact exit code, a message naming the file, nothing copied into the registry (and `registry verify`
of what is there still passes), and no byte of a link's target read into a registry version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from lorafleet.errors import ConfigError
from lorafleet.serving.adapters import AdapterError, inspect_adapter
from lorafleet.serving.config import ServingConfig
from tests import hostile_adapters
from tests.helpers import run_cli

SECRET = "root:x:0:0:secret-marker\n"


@pytest.fixture(scope="module")
def good_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    from lorafleet.serving.testing import make_adapter

    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("good") / "a", "lora", seed=1)


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(SECRET)
    return secret


def _link_tokenizer_config(folder: Path, tmp_path: Path) -> str:
    (folder / "tokenizer_config.json").unlink(missing_ok=True)
    os.symlink(_secret(tmp_path), folder / "tokenizer_config.json")
    return "tokenizer_config.json is a symbolic link"


def _link_weights(folder: Path, tmp_path: Path) -> str:
    outside = tmp_path / "outside" / "weights.safetensors"
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(folder / "adapter_model.safetensors", outside)
    os.symlink(outside, folder / "adapter_model.safetensors")
    return "adapter_model.safetensors is a symbolic link"


def _truncate_weights(folder: Path, tmp_path: Path) -> str:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return "adapter_model.safetensors is truncated or padded"


def _garbage_weights(folder: Path, tmp_path: Path) -> str:
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    return "adapter_model.safetensors is truncated or not safetensors"


def _corrupt_config(folder: Path, tmp_path: Path) -> str:
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    return "adapter_config.json is not valid JSON"


def _config_peft_refuses(folder: Path, tmp_path: Path) -> str:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "NOT_A_METHOD"}))
    return "adapter_config.json: PEFT cannot read this config"


def _shared(change):
    return lambda folder, tmp_path: change(folder)


HOSTILE = {
    **{case: _shared(change) for case, change in {**hostile_adapters.SHARED, **hostile_adapters.WEIGHTS}.items()},
    "linked tokenizer config": _link_tokenizer_config,
    "linked weights": _link_weights,
    "truncated weights": _truncate_weights,
    "garbage weights": _garbage_weights,
    "corrupt adapter config": _corrupt_config,
    "config PEFT refuses": _config_peft_refuses,
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_publish_refuses_a_hostile_adapter_folder(good_adapter: Path, tmp_path: Path, case: str) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(good_adapter, folder)
    expected = HOSTILE[case](folder, tmp_path)
    storage = tmp_path / "storage"
    result = run_cli("publish", str(folder), "--name", "hostile", "--storage", str(storage), timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    versions = list((storage / "adapters" / "hostile").glob("v*")) if (storage / "adapters").exists() else []
    assert versions == []
    leaked = [p for p in storage.rglob("*") if p.is_file() and SECRET.strip() in p.read_text(errors="ignore")]
    assert leaked == []


def test_a_run_whose_adapter_folder_is_a_link_is_refused(good_adapter: Path, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    linked_run = tmp_path / "run"
    linked_run.mkdir()
    os.symlink(good_adapter, linked_run / "adapter")
    result = run_cli("publish", str(linked_run), "--name", "x", "--storage", str(storage), timeout=120)
    assert result.returncode == 1 and "adapter is a symbolic link" in result.stderr, result.stderr
    assert not (storage / "adapters" / "x").exists() or not list((storage / "adapters" / "x").glob("v*"))


def test_a_clean_folder_still_publishes_and_verifies(good_adapter: Path, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    published = run_cli("publish", str(good_adapter), "--name", "clean", "--storage", str(storage), timeout=120)
    assert published.returncode == 0, published.stderr
    verified = run_cli("registry", "verify", "clean", "--storage", str(storage), timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_serving_refuses_a_weight_file_linked_outside_the_folder(good_adapter, tiny_model_dir, tmp_path) -> None:
    root = tmp_path / "root"
    folder = root / "a"
    shutil.copytree(good_adapter, folder)
    _link_weights(folder, tmp_path)
    config = ServingConfig(base=tiny_model_dir, adapter_roots=[str(root)])
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors is a link to .*outside the adapter folder"):
        inspect_adapter("a", folder, config)


def _flip_a_weight_byte(version: Path) -> str:
    weights = version / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return "adapter_model.safetensors: sha256 does not match the manifest"


def _truncate_published_weights(version: Path) -> str:
    weights = version / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    return "adapter_model.safetensors: size"


def _delete_config(version: Path) -> str:
    (version / "adapter_config.json").unlink()
    return "adapter_config.json: missing"


def _add_a_file(version: Path) -> str:
    (version / "extra.py").write_text("print('hi')\n")
    return "extra.py: not listed in the manifest"


def _swap_weights_for_a_link(version: Path) -> str:
    weights = version / "adapter_model.safetensors"
    outside = version.parent.parent.parent / "elsewhere.safetensors"
    shutil.move(weights, outside)
    os.symlink(outside, weights)
    return "adapter_model.safetensors: is a link"


TAMPERED = {
    "flipped weight byte": _flip_a_weight_byte,
    "truncated weights": _truncate_published_weights,
    "deleted adapter config": _delete_config,
    "added file": _add_a_file,
    "weights swapped for a link": _swap_weights_for_a_link,
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_version_is_refused_by_promote_serve_load_and_sync(good_adapter, tiny_model_dir, tmp_path, case):
    from lorafleet.registry import TamperedVersion, promote, publish_adapter, resolve
    from lorafleet.serving.config import with_registry_adapters
    from lorafleet.serving.sync import read_desired
    from lorafleet.serving.sync_config import SyncConfig

    storage = tmp_path / "storage"
    version = publish_adapter(storage, "pricing", good_adapter).path
    expected = TAMPERED[case](version)
    with pytest.raises(TamperedVersion, match=expected):
        promote(storage, "pricing", "v1")
    with pytest.raises(TamperedVersion, match=expected):
        resolve(storage, "pricing@v1")
    served = ServingConfig(base=tiny_model_dir, storage=str(storage), registry_adapters=["pricing@v1"])
    with pytest.raises(ConfigError, match=expected):
        with_registry_adapters(served)
    loading = ServingConfig(base=tiny_model_dir, adapter_roots=[str(storage)])
    with pytest.raises(AdapterError, match=expected) as refused:
        inspect_adapter("pricing", version, loading)
    assert refused.value.status == 400
    desired = read_desired(SyncConfig(storage=str(storage), targets=["http://127.0.0.1:9"], adapters=["pricing"]))
    assert "pricing" not in desired.adapters and any(re.search(expected, e) for e in desired.errors), desired.errors
    result = run_cli("promote", "pricing", "v1", "--storage", str(storage), timeout=120)
    assert result.returncode == 1 and re.search(expected, result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_an_intact_version_is_hashed_once_then_again_only_after_it_changes(good_adapter, tmp_path, monkeypatch):
    from lorafleet.registry import manifest, publish_adapter, require_intact, verify

    version = publish_adapter(tmp_path / "storage", "cached", good_adapter).path
    hashed: list[str] = []
    real_sha256 = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path: hashed.append(Path(path).name) or real_sha256(path))
    for _ in range(3):
        require_intact(version, "cached", "v1")
    assert sorted(hashed) == sorted(p.name for p in version.iterdir() if p.name != "manifest.json")
    hashed.clear()
    os.utime(version / "adapter_config.json")  # touched, same bytes: hashed again, still intact
    require_intact(version, "cached", "v1")
    assert hashed == ["adapter_config.json"]
    assert verify(tmp_path / "storage").ok


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 2 MiB tmpfs (root mounts it, as CI runs): storage that fills up and can be remounted read-only."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.fail(f"mounting a tmpfs needs root: {made.stderr.decode().strip()}", pytrace=False)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_full_disk_and_read_only_storage_are_clear_errors_and_the_registry_stays_intact(
    good_adapter: Path, small_disk: Path
) -> None:
    import subprocess

    storage = small_disk / "storage"
    assert run_cli("publish", str(good_adapter), "--name", "price", "--storage", str(storage)).returncode == 0
    before = _files(storage)
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk to its last byte
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    full = run_cli("publish", str(good_adapter), "--name", "price", "--storage", str(storage))
    assert full.returncode == 1, full.stdout + full.stderr
    assert "No space left on device" in full.stderr and "the disk is full" in full.stderr, full.stderr
    assert "Traceback" not in full.stderr
    assert _files(storage) == before and run_cli("registry", "verify", "--storage", str(storage)).returncode == 0

    filler.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for args in (["publish", str(good_adapter), "--name", "price"], ["promote", "price", "v1"]):
        refused = run_cli(*args, "--storage", str(storage))
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "Read-only file system" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert _files(storage) == before and run_cli("registry", "verify", "--storage", str(storage)).returncode == 0


def test_verify_of_an_unknown_name_or_a_missing_storage_fails(good_adapter: Path, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    missing = run_cli("registry", "verify", "--storage", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "does not exist: there is no registry to verify" in missing.stderr
    assert run_cli("publish", str(good_adapter), "--name", "price", "--storage", str(storage)).returncode == 0
    unknown = run_cli("registry", "verify", "pricee", "--storage", str(storage))
    assert unknown.returncode == 1 and "nothing named 'pricee'" in unknown.stderr, unknown.stderr
    assert run_cli("registry", "verify", "price", "--storage", str(storage)).returncode == 0


def test_publish_with_a_corrupt_aliases_file_claims_no_version(good_adapter: Path, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    assert run_cli("publish", str(good_adapter), "--name", "price", "--storage", str(storage)).returncode == 0
    aliases = storage / "adapters" / "price" / "aliases.json"
    aliases.write_text('{"aliases": {"prod": ')
    result = run_cli("publish", str(good_adapter), "--name", "price", "--storage", str(storage))
    assert result.returncode == 1 and "aliases.json" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (storage / "adapters" / "price").iterdir() if p.name.startswith("v")) == ["v1"]
