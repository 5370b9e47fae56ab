"""`precision: auto`: the floating-point precision this machine computes fastest, for training and the CPU engine.

On a CUDA device: bf16 where the GPU supports it, else fp16. On a CPU: bf16 where the CPU multiplies bf16
natively (AVX-512 BF16, AMX, Arm BF16), fp32 otherwise. oneDNN's own capability check is necessary but not
enough (it also accepts AVX-512 CPUs without the BF16 extension, where bf16 is emulated and slower than fp32),
so it is confirmed by a short timed matmul: bf16 must beat fp32 by `MIN_SPEEDUP`. The verdict is cached per
machine (CPU model and flags, torch version) in `$LORAFLEET_HOME/machine/`, so the ~0.2 s measurement runs once.

`LORAFLEET_CPU_BF16=1` (or `0`) overrides the check: for tests, and for a user who knows the machine better.
An explicit `fp32` / `bf16` / `fp16` in a config or on the command line always wins over `auto`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorafleet.paths import home

MIN_SPEEDUP = 1.3  # bf16 over fp32 matmul, one thread; native bf16 measures ~1.8-2.5x, emulated ≤ 1x
OVERRIDE_VARIABLE = "LORAFLEET_CPU_BF16"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU multiplies bf16 natively, why we think so, and the rates measured (GFLOP/s, one thread)."""

    native: bool
    reason: str
    bf16_gflops: float | None = None
    fp32_gflops: float | None = None


@dataclass(frozen=True)
class Precision:
    """What `auto` (or an explicit choice) resolved to on one device, and why."""

    requested: str
    name: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.name]

    def describe(self) -> str:
        if self.requested == "auto":
            return f"precision auto -> {self.name}: {self.reason}"
        return f"precision {self.name} (set explicitly)"


def resolve_precision(requested: str, device: torch.device | str = "cpu") -> Precision:
    """`requested` as given, or for `auto` the fastest precision on `device` with the reason."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return Precision(requested, requested, "set explicitly")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("auto", "bf16", f"{torch.cuda.get_device_name(device)} supports bf16")
        return Precision("auto", "fp16", f"{torch.cuda.get_device_name(device)} has no bf16; fp16 mixed precision")
    if device.type != "cpu":
        return Precision("auto", "fp32", f"no mixed-precision rule for {device.type} devices")
    verdict = cpu_bf16()
    return Precision("auto", "bf16" if verdict.native else "fp32", verdict.reason)


@functools.cache
def cpu_bf16() -> CpuBf16:
    """This CPU's bf16 verdict: the override variable, else the cached verdict, else measured (and cached)."""
    forced = os.environ.get(OVERRIDE_VARIABLE, "").strip()
    if forced in ("0", "1"):
        native = forced == "1"
        return CpuBf16(native, f"{OVERRIDE_VARIABLE}={forced} says the CPU {'has' if native else 'has no'} native bf16")
    cache = _cache_file()
    try:
        return CpuBf16(**json.loads(cache.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    verdict = measure_cpu_bf16()
    try:  # a read-only cache only costs the measurement next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f".{cache.name}.{os.getpid()}")
        partial.write_text(json.dumps(asdict(verdict)))
        partial.replace(cache)
    except OSError:
        pass
    return verdict


def measure_cpu_bf16(size: int = 512) -> CpuBf16:
    """oneDNN's capability check, then bf16 vs fp32 matmul rates on one thread (best of several runs)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return CpuBf16(False, "oneDNN reports no bf16 support on this CPU")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32, bf16 = (matmul_gflops(torch.float32, size), matmul_gflops(torch.bfloat16, size))
    finally:
        torch.set_num_threads(threads)
    rates = f"bf16 matmul {bf16:.0f} GFLOP/s vs fp32 {fp32:.0f} per core"
    if bf16 >= MIN_SPEEDUP * fp32:
        return CpuBf16(True, f"native bf16 on this CPU ({rates})", round(bf16, 1), round(fp32, 1))
    return CpuBf16(False, f"bf16 is emulated on this CPU ({rates})", round(bf16, 1), round(fp32, 1))


def matmul_gflops(dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """GFLOP/s of a `size`³ matmul in `dtype` at the current torch threads: the best of `repeats` after a warm-up."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # first call: oneDNN's kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _cache_file() -> Path:
    """One file per CPU model, its feature flags and the torch build: a different machine measures again."""
    identity = f"{platform.machine()}|{_cpu_identity()}|torch {torch.__version__}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return home() / "machine" / f"cpu-bf16-{digest}.json"


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    fields = ("model name", "flags", "Features", "CPU part")
    return "|".join(sorted({line.strip() for line in lines if line.split(":")[0].strip() in fields}))
