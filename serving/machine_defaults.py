"""The CPU engine's settings left to `auto`, chosen from this machine and the model: dtype and batch size.

- dtype `auto`: bfloat16 where the CPU multiplies bf16 natively (`lorafleet.precision`: oneDNN's check and a
  timed matmul, cached per machine), else float32; on a CUDA device bf16 or fp16 as the GPU supports.
- `max_batch_size` unset: as many rows as fit their worst-case KV cache (every row at `max_model_len`, in the
  engine's dtype) in `KV_MEMORY_SHARE` of the memory available beside the loaded weights, at most `MAX_AUTO_BATCH`.
  Decoding more rows together costs little more per step on a CPU (the weights are read once per step for all of
  them), so the batch is as large as memory allows: a fixed 8 halved the throughput for 16 concurrent clients.

Both are printed at start with the reason (`Defaults.describe`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lorafleet.precision import resolve_precision

KV_MEMORY_SHARE = 0.5
MAX_AUTO_BATCH = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Choice:
    value: object
    reason: str


def engine_dtype(requested: str, device: torch.device | str = "cpu") -> Choice:
    """The torch dtype the engine loads the base in (`requested`: auto, float32, bfloat16, float16)."""
    if requested != "auto":
        return Choice(DTYPES[requested], "set explicitly")
    chosen = resolve_precision("auto", device)
    return Choice(chosen.dtype, f"auto: {chosen.reason}")


def batch_size(model_config, dtype: torch.dtype, max_model_len: int, available: int | None = None) -> Choice:
    """Rows decoded together: their worst-case KV within a share of the available memory (see the docstring)."""
    available = available_memory() if available is None else available
    per_row = kv_bytes_per_token(model_config, dtype) * max_model_len
    rows = max(1, min(MAX_AUTO_BATCH, int(KV_MEMORY_SHARE * available // per_row)))
    return Choice(
        rows,
        f"auto: {rows} rows x {max_model_len} tokens of KV ({_gib(rows * per_row)}) within "
        f"{KV_MEMORY_SHARE:.0%} of the {_gib(available)} available (at most {MAX_AUTO_BATCH})",
    )


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer."""
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return 2 * model_config.num_hidden_layers * heads * head_dim * torch.finfo(dtype).bits // 8


def available_memory() -> int:
    """Bytes this process may still use: the machine's available memory, within a cgroup limit where one is set."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return min(available, _cgroup_room())


def _cgroup_room() -> int:
    try:
        with open("/sys/fs/cgroup/memory.max") as limit_file, open("/sys/fs/cgroup/memory.current") as used_file:
            limit = limit_file.read().strip()
            return 2**62 if limit == "max" else int(limit) - int(used_file.read())
    except (OSError, ValueError):
        return 2**62


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"
