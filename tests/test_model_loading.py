"""One base-model loading policy for training, eval, merge, compose and serving: safetensors only, the pinned
revision, `trust_remote_code` as the job config says (off by default).

A folder holding only a pickled `pytorch_model.bin` (unpickling can run code) is refused by every entry point,
naming the file; the code-shape test keeps every base load going through `lorafleet.model_loading`.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from lorafleet.model_loading import UnsafeWeights, load_base_model_weights, require_safetensors
from tests.helpers import REPO


@pytest.fixture(scope="module")
def pickled_only(tiny_model_dir, tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickled") / "base"
    shutil.copytree(tiny_model_dir, folder)
    state = {}
    for weights in folder.glob("*.safetensors"):
        state |= load_file(str(weights))
        weights.unlink()
    torch.save(state, folder / "pytorch_model.bin")  # the pickled format older checkpoints ship
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    return folder


def test_the_shared_loader_refuses_pickled_weights_and_loads_safetensors(pickled_only, tiny_model_dir) -> None:
    with pytest.raises(UnsafeWeights, match="pytorch_model.bin"):
        load_base_model_weights(str(pickled_only))
    assert load_base_model_weights(tiny_model_dir).config.model_type == "llama"
    require_safetensors("someone/hub-model")  # hub ids: the loader itself asks for safetensors only


def test_the_cpu_engine_refuses_a_pickled_base(pickled_only) -> None:
    from lorafleet.serving.config import ServingConfig
    from lorafleet.serving.engine import CPUEngine

    with pytest.raises(UnsafeWeights, match="safetensors only"):
        CPUEngine(ServingConfig(base=str(pickled_only))).start()


def test_training_refuses_a_pickled_base(pickled_only) -> None:
    import torch

    from lorafleet.config import ModelSection, TrainingSection
    from lorafleet.training.model import load_base_model

    with pytest.raises(UnsafeWeights, match="pytorch_model.bin"):
        load_base_model(ModelSection(name_or_path=str(pickled_only)), TrainingSection(), torch.device("cpu"))


def test_every_base_model_load_goes_through_the_one_loader() -> None:
    """No `AutoModelForCausalLM.from_pretrained` outside lorafleet/model_loading.py (test helpers and the GGUF
    import, which reads a GGUF file, are the exceptions)."""
    allowed = {"lorafleet/model_loading.py", "lorafleet/gguf_import.py", "serving/testing.py"}
    found = []
    for folder in ("lorafleet", "training", "serving"):
        for path in (REPO / folder).rglob("*.py"):
            relative = str(path.relative_to(REPO))
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == "from_pretrained"
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "AutoModelForCausalLM"
                    and relative not in allowed
                ):
                    found.append(f"{relative}:{node.lineno}")
    assert found == []
