"""Hostile changes to a copy of a good LoRA adapter folder, shared by the publish and the serving tests.

Each function breaks `folder` one way and returns the words the refusal must contain. Publish and the server's
load go through the same checks (`lorafleet.registry.checks`, `lorafleet.registry.contract`), so both refuse
every case with the same words.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _write_config_text(folder: Path, text: str) -> None:
    (folder / "adapter_config.json").write_text(text)


def _alpha(value: str) -> Callable[[Path], str]:
    def change(folder: Path) -> str:
        text = json.dumps(_config(folder) | {"lora_alpha": "ALPHA"}).replace('"ALPHA"', value)
        _write_config_text(folder, text)
        return {
            "NaN": "NaN is not a JSON number",
            "Infinity": "Infinity is not a JSON number",
            "1e400": "the number 1e400 is out of range",
        }.get(value, "lora_alpha must be a finite number")

    return change


def _field(key: str, value: object, words: str) -> Callable[[Path], str]:
    def change(folder: Path) -> str:
        _write_config_text(folder, json.dumps(_config(folder) | {key: value}))
        return words

    return change


def _config_is(text: str, words: str) -> Callable[[Path], str]:
    def change(folder: Path) -> str:
        _write_config_text(folder, text)
        return words

    return change


def _deep_nesting(folder: Path) -> str:
    _write_config_text(folder, '{"peft_type": "LORA", "x": ' + "[" * 5000 + "]" * 5000 + "}")
    return "nested deeper than"


def _huge_integer(folder: Path) -> str:
    _write_config_text(folder, json.dumps(_config(folder)).replace('"r": 8', '"r": 1' + "0" * 5000))
    return "a number is too large"


def _config_fifo(folder: Path) -> str:
    (folder / "adapter_config.json").unlink()
    os.mkfifo(folder / "adapter_config.json")
    return "not a regular file"


def _weights_fifo(folder: Path) -> str:
    (folder / "adapter_model.safetensors").unlink()
    os.mkfifo(folder / "adapter_model.safetensors")
    return "not a regular file"


def _weights(change: Callable) -> Callable[[Path], str]:
    def apply(folder: Path) -> str:
        from safetensors.torch import load_file, save_file

        path = folder / "adapter_model.safetensors"
        tensors, words = change(load_file(str(path)))
        save_file(tensors, str(path))
        return words

    return apply


def _nan_in_b(tensors: dict) -> tuple[dict, str]:
    name = next(name for name in tensors if "lora_B" in name)
    tensors[name][0, 0] = float("nan")
    return tensors, f"tensor {name} holds NaN or infinite values"


def _as_int8(tensors: dict) -> tuple[dict, str]:
    import torch

    return {name: tensor.to(torch.int8) for name, tensor in tensors.items()}, "holds I8 tensors"


def _as_float64(tensors: dict) -> tuple[dict, str]:
    import torch

    return {name: tensor.to(torch.float64) for name, tensor in tensors.items()}, "holds F64 tensors"


def _no_lora_tensors(tensors: dict) -> tuple[dict, str]:
    import torch

    return {"unrelated.weight": torch.zeros(2, 2)}, "has no lora_A or lora_B tensors"


# Refused by the config and weights checks that publish and the server's load share.
SHARED = {
    "lora_alpha NaN": _alpha("NaN"),
    "lora_alpha Infinity": _alpha("Infinity"),
    "lora_alpha 1e400": _alpha("1e400"),
    "lora_alpha 1e308": _alpha("1e308"),
    "config is a list": _config_is("[1, 2]", "must be a JSON object with a peft_type"),
    "config is null": _config_is("null", "must be a JSON object with a peft_type"),
    "config nested 5000 deep": _deep_nesting,
    "a 5000-digit integer": _huge_integer,
    "config is a FIFO": _config_fifo,
    "r is a word": _field("r", "eight", 'r must be an integer from 1 to 65536, not "eight"'),
    "r is a fraction": _field("r", 8.5, "r must be an integer from 1 to 65536, not 8.5"),
    "r is true": _field("r", True, "r must be an integer from 1 to 65536, not true"),
    "lora_alpha is a string": _field("lora_alpha", "16", "lora_alpha must be a finite number"),
    "target_modules is a number": _field("target_modules", 3, "target_modules must be a string or a list"),
}
# Refused by publish (every tensor read) and by the server's load (the header read): NaN needs the tensors.
WEIGHTS = {
    "NaN in lora_B": _weights(_nan_in_b),
    "int8 weights": _weights(_as_int8),
    "float64 weights": _weights(_as_float64),
    "no LoRA tensors": _weights(_no_lora_tensors),
    "weights are a FIFO": _weights_fifo,
}
