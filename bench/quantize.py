"""The CPU engine serving a quantized base, against float32 measured in the same run.

    .venv/bin/python bench/quantize.py                                             # SmolLM2-135M, ~5 min
    .venv/bin/python bench/quantize.py --model builtin:tiny-llama --variants fp32,int8 --tokens 8

Each variant is `lorafleet serve --engine cpu` in a process of its own with four random LoRA adapters (rank 16)
loaded; REQUESTS requests spread over the four adapters are sent at once through the official openai client
(one mixed-adapter batch of REQUESTS rows). Variants:
- fp32, bf16:  the float base (`--dtype float32|bfloat16`), linear weights packed by oneDNN;
- int8, int4:  `--quantization int8|int4`, the base rounded at load, every Linear on int8 kernels;
- int4-folder: a `lorafleet quantize --method int4` folder served as it is (what vLLM would load), whose
               adapters are the source base's.
Printed per variant: decode tokens/s (best of --repeat), the engine's weight memory (its own count at load:
parameters, packed copies, int8 integers and scales), resident memory after the runs and its peak (VmHWM,
the load included), each as a ratio to fp32. Goal (the quantized-deployment issue): int8 >= 1.5x fp32's
decode tokens/s at batch 16 and <= 0.5x its weight memory.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from serve_process import ServeProcess  # noqa: E402 (bench/ is the script's folder)
from serve_throughput import ADAPTERS, http_tokens_per_s  # noqa: E402

VARIANTS = {  # name -> lorafleet serve arguments (int4-folder's --base is filled in once quantized)
    "fp32": ["--dtype", "float32"],
    "bf16": ["--dtype", "bfloat16"],
    "int8": ["--dtype", "float32", "--quantization", "int8"],
    "int4": ["--dtype", "float32", "--quantization", "int4"],
    "int4-folder": ["--dtype", "float32"],
}
WEIGHTS = re.compile(r"base weights (.+?) \(([\d.]+) MB\)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--requests", type=int, default=16, help="requests sent at once (= the batch)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--repeat", type=int, default=3, help="timed batches per variant (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="the server's OMP_NUM_THREADS (default: torch's)")
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; use {', '.join(VARIANTS)}")
    args.variants = list(dict.fromkeys(["fp32", *args.variants]))  # every ratio is against fp32
    return args


def process_memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def quantized_folder(model: str, method: str, out: Path) -> Path:
    command = [sys.executable, "-m", "lorafleet", "quantize", model, "--method", method, "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return out


def measure(args, name: str, serve_args: list[str], adapters: dict[str, Path], work: Path) -> dict[str, float]:
    prompts = [f"Request {i}: describe item number {i} in a few words." for i in range(args.requests)]
    requests = [(ADAPTERS[i % len(ADAPTERS)], {}) for i in range(args.requests)]
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    with ServeProcess(serve_args, adapters, log=work / f"{name}.log", env=threads) as server:
        http_tokens_per_s(server.url, prompts[:4], requests[:4], 4)  # warm-up
        rates = [http_tokens_per_s(server.url, prompts, requests, args.tokens) for _ in range(args.repeat)]
        rss, peak = process_memory_mb(server.process.pid)
        found = WEIGHTS.search(server.log_path.read_text())
    if found is None:
        raise RuntimeError(f"{name}: the server did not print its weight memory; its log: {server.log_path}")
    return {"decode": max(rates), "weights": float(found.group(2)), "rss": rss, "peak": peak}


def main() -> None:
    args = parse_args()
    from lorafleet.models import resolve_model
    from lorafleet.serving.testing import make_adapter

    base_dir = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-quantize-"))
    adapters = {name: make_adapter(base_dir, work / name, "lora", seed=i, rank=16) for i, name in enumerate(ADAPTERS)}
    rows = {}
    for name in args.variants:
        base = args.model
        if name == "int4-folder":
            base = str(quantized_folder(args.model, "int4", work / "int4-folder"))
        serve_args = ["--base", base, "--max-batch-size", str(args.requests), "--max-lora-rank", "16"]
        print(f"[bench] {name}: serving", file=sys.stderr, flush=True)
        rows[name] = measure(args, name, [*serve_args, *VARIANTS[name]], adapters, work)

    reference = rows["fp32"]
    print(f"model {args.model} | {args.requests} requests x {args.tokens} tokens, 4 LoRA adapters mixed | "
          f"{os.cpu_count()} CPUs | each variant its own `lorafleet serve` process")  # fmt: skip
    print(f"{'variant':<12} {'decode tok/s':>12} {'vs fp32':>8} {'weights MB':>11} {'vs fp32':>8} "
          f"{'RSS MB':>7} {'peak RSS MB':>12} {'vs fp32':>8}")  # fmt: skip
    for name, row in rows.items():
        print(
            f"{name:<12} {row['decode']:12.1f} {row['decode'] / reference['decode']:7.2f}x {row['weights']:11.1f} "
            f"{row['weights'] / reference['weights']:7.2f}x {row['rss']:7.0f} {row['peak']:12.0f} "
            f"{row['peak'] / reference['peak']:7.2f}x"
        )
    if "int8" in rows:
        int8 = rows["int8"]
        print(
            f"int8 / fp32: decode {int8['decode'] / reference['decode']:.2f}x (goal >= 1.5x), weight memory "
            f"{int8['weights'] / reference['weights']:.2f}x (goal <= 0.5x)"
        )


if __name__ == "__main__":
    main()
