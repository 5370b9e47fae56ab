"""What the registry verifies before it stores an adapter: its files parse as PEFT would read them.

`adapter_config.json` must be a PEFT config (loaded with PEFT's own `PeftConfig`), and
`adapter_model.safetensors` a complete safetensors file: an 8-byte header length, a JSON header, and tensor
byte ranges that tile the data section exactly (a truncated or padded file is refused).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lorafleet.registry.layout import RegistryError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's config as a dict, after PEFT itself accepted it; RegistryError naming the file otherwise."""
    path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise RegistryError(f"{path} is not a PEFT adapter config: it has no peft_type")
    from peft import PeftConfig

    try:
        PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:  # PEFT raises TypeError/ValueError/KeyError for configs it cannot build
        raise RegistryError(f"{path}: PEFT cannot read this config: {type(exc).__name__}: {exc}") from None
    return config


def check_safetensors(path: Path) -> None:
    """A complete safetensors file, or RegistryError saying what is wrong with it."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise RegistryError(f"{path} is not a safetensors file: {size} bytes, shorter than its header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise RegistryError(f"{path} is truncated or not safetensors: header of {header_len} bytes in {size}")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise RegistryError(f"{path}: the safetensors header is not a JSON object")
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    try:
        ranges = sorted((int(entry["data_offsets"][0]), int(entry["data_offsets"][1])) for entry in tensors.values())
    except (TypeError, KeyError, IndexError, ValueError):
        raise RegistryError(f"{path}: a tensor entry of the safetensors header has no valid data_offsets") from None
    end = 0
    for start, stop in ranges:
        if start != end or stop < start:
            raise RegistryError(f"{path}: tensor byte ranges overlap or leave a gap at byte {end}")
        end = stop
    data_bytes = size - 8 - header_len
    if end != data_bytes:
        raise RegistryError(
            f"{path} is truncated or padded: its header describes {end} bytes of tensors, the file holds {data_bytes}"
        )
