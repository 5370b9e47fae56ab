"""Hostile adapter folders at publish and at load: links out of the folder, truncated or corrupt files.

Each case: the exact exit code, a message naming the file, nothing copied into the registry (and `registry verify`
of what is there still passes), and no byte of a link's target read into a registry version.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lorafleet.serving.adapters import AdapterError, inspect_adapter
from lorafleet.serving.config import ServingConfig
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


HOSTILE = {
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
