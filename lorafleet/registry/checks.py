"""What the registry verifies before it stores an adapter: its files parse as PEFT would read them.

`adapter_config.json` must be a PEFT config (loaded with PEFT's own `PeftConfig`), and
`adapter_model.safetensors` a complete safetensors file: an 8-byte header length, a JSON header, and tensor
byte ranges that tile the data section exactly (a truncated or padded file is refused).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from lorafleet.json_input import JsonInputError, parse_json, read_json_file
from lorafleet.registry.layout import RegistryError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
ADAPTER_DTYPES = ("F32", "BF16", "F16")
REQUIRED_TENSORS = {
    "LORA": ("lora_A", "lora_B"),
    "PROMPT_TUNING": ("prompt_embeddings",),
    "P_TUNING": ("prompt_embeddings",),
    "PREFIX_TUNING": ("prompt_embeddings",),
    "IA3": ("ia3_l",),
}


MAX_RANK = 65536
MAX_ABS_ALPHA = 1e6  # scaling = alpha / r; past this a float16 or bfloat16 delta overflows on the first token
# Keys PEFT and the servers read as plain values: anything else is refused by name (not a 500 later).
TYPED_FIELDS = [
    *[(key, (str,), "a string") for key in ("base_model_name_or_path", "revision", "task_type", "bias")],
    *[(key, (bool,), "true or false") for key in ("use_dora", "use_rslora", "fan_in_fan_out", "inference_mode")],
]
# Prompt-learning sizes: each is a positive integer up to its bound (PEFT allocates tensors of these sizes).
SIZE_FIELDS = {"num_virtual_tokens": 65536, "num_layers": 4096, "num_attention_heads": 4096, "token_dim": 2**20}


def load_adapter_config(adapter_dir: Path) -> dict:
    """`adapter_config.json` as a dict after the checks that need no PEFT: a regular file of at most 1 MiB (a
    FIFO never blocks the reader), strict JSON, an object with a peft_type, ranks and scalings that keep the
    adapter's output finite. RegistryError naming the file and the field otherwise."""
    path = adapter_dir / "adapter_config.json"
    try:
        config = read_json_file(path)
    except FileNotFoundError:
        raise RegistryError(f"{adapter_dir} has no adapter_config.json: not a PEFT adapter folder") from None
    except JsonInputError as exc:
        message = str(exc)
        if message.startswith("invalid JSON: "):
            raise RegistryError(f"{path} is not valid JSON: {message.removeprefix('invalid JSON: ')}") from None
        raise RegistryError(message if str(path) in message else f"{path}: {message}") from None
    except OSError as exc:
        raise RegistryError(f"{path} cannot be read: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str) or not config["peft_type"]:
        raise RegistryError(f"{path} is not a PEFT adapter config: it must be a JSON object with a peft_type")
    problems = adapter_config_problems(config)
    if problems:
        raise RegistryError(f"{path}: " + "; ".join(problems))
    return config


def adapter_config_problems(config: dict) -> list[str]:
    """Values that would make the adapter's output non-finite or its shapes absurd ([] = none)."""
    problems = []
    if "r" in config and not _int_in(config["r"], 1, MAX_RANK):
        problems.append(f"r must be an integer from 1 to {MAX_RANK}, not {_shown(config['r'])}")
    if "lora_alpha" in config and not _number_within(config["lora_alpha"], MAX_ABS_ALPHA):
        shown = _shown(config["lora_alpha"])
        problems.append(f"lora_alpha must be a finite number within ±{MAX_ABS_ALPHA:g}, not {shown}")
    for key, check, wanted in (
        ("rank_pattern", lambda v: _int_in(v, 1, MAX_RANK), f"integers from 1 to {MAX_RANK}"),
        ("alpha_pattern", lambda v: _number_within(v, MAX_ABS_ALPHA), f"finite numbers within ±{MAX_ABS_ALPHA:g}"),
    ):
        pattern = config.get(key)
        if pattern is not None and not (isinstance(pattern, dict) and all(check(v) for v in pattern.values())):
            problems.append(f"{key} must map module names to {wanted}")
    for key, bound in SIZE_FIELDS.items():
        if config.get(key) is not None and not _int_in(config[key], 1, bound):
            problems.append(f"{key} must be an integer from 1 to {bound}, not {_shown(config[key])}")
    for key, kinds, wanted in TYPED_FIELDS:
        if config.get(key) is not None and type(config[key]) not in kinds:
            problems.append(f"{key} must be {wanted}, not {_shown(config[key])}")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        problems.append("modules_to_save must be a list of module names")
    targets = config.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        problems.append("target_modules must be a string or a list of strings")
    return problems


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's config as a dict, after PEFT itself accepted it; RegistryError naming the file otherwise."""
    config = load_adapter_config(adapter_dir)
    from peft import PeftConfig

    try:
        PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:  # PEFT raises TypeError/ValueError/KeyError for configs it cannot build
        path = adapter_dir / "adapter_config.json"
        raise RegistryError(f"{path}: PEFT cannot read this config: {type(exc).__name__}: {exc}") from None
    return config


def _int_in(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _number_within(value: object, bound: float) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and abs(value) <= bound


def _shown(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {dtype, shape, data_offsets} from a safetensors header (reads only the header)."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size <= MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file")
        header = parse_json(handle.read(size))
    if not isinstance(header, dict) or not all(isinstance(entry, dict) for entry in header.values()):
        raise ValueError(f"{path}: the safetensors header is not a JSON object of tensors")
    return {name: entry for name, entry in header.items() if name != "__metadata__"}


def safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header (reads only the header, not the weights)."""
    return list(safetensors_header(path))


def adapter_weights_problems(weights: Path, peft_type: str | None) -> list[str]:
    """Why the adapter's safetensors cannot be what its config says: weights of a float dtype, and the tensors
    its method needs (a LoRA file without lora_A/lora_B tensors would load as an adapter that changes nothing)."""
    try:
        header = safetensors_header(weights)
    except (ValueError, OSError) as exc:
        return [f"{weights.name} cannot be read: {exc}"]
    odd = sorted({str(entry.get("dtype")) for entry in header.values()} - set(ADAPTER_DTYPES))
    reasons = []
    if odd:
        allowed = ", ".join(ADAPTER_DTYPES)
        reasons.append(f"{weights.name} holds {', '.join(odd)} tensors: adapter weights must be {allowed}")
    needed = REQUIRED_TENSORS.get(peft_type or "", ())
    missing = [part for part in needed if not any(part in name for name in header)]
    if missing:
        wanted = " or ".join(missing)
        reasons.append(f"{weights.name} has no {wanted} tensors: not the weights of a {peft_type} adapter")
    return reasons


def check_finite_weights(path: Path) -> None:
    """RegistryError naming the first floating point tensor that holds a NaN or an infinity (a diverged run's
    weights). Tensors are read one at a time, so a merged model's file never sits in memory whole."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensor = handle.get_tensor(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise RegistryError(
                    f"{path}: tensor {name} holds NaN or infinite values (did the training run diverge? "
                    "see its metrics): refused"
                )
