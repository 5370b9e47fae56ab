"""`lorafleet serve`: the OpenAI-compatible multi-adapter server (CPU engine here, vLLM on GPUs).

lorafleet serve --base builtin:tiny-llama --adapter a=runs/x/adapter --port 8000
lorafleet serve --storage /mnt/shared --adapters pricing@prod,support      # from the registry
lorafleet serve --engine vllm --config serve.yaml --print-command           # the exact `vllm serve` argv
"""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from lorafleet.errors import ConfigError, Problem

# The options that pick the base model and its adapters; `lorafleet batch` takes the same ones.
BaseOption = typer.Option(
    None, "--base", help="Base model: builtin:<name>, a local folder, a hub id, or registry:NAME[@VER] (merged)."
)
AdapterOption = typer.Option(None, "--adapter", help="NAME=PATH of an adapter to load at start. Repeatable.")
AdaptersOption = typer.Option(None, "--adapters", help="Registry adapters NAME[@ALIAS],... (in --storage).")
StorageOption = typer.Option(None, "--storage", help="Shared storage URI holding the registry.")
ConfigOption = typer.Option(None, "--config", dir_okay=False, help="Serving YAML; flags override it.")


def split_list(text: str | None) -> list[str]:
    """A comma-separated flag value (`a, b@prod`) as its non-empty items."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def serving_settings(config: Path | None, overrides: dict):
    """The ServingConfig of YAML + flags, with `--adapters` resolved in the registry (every problem at once)."""
    from lorafleet.serving.config import build_serving_config, with_registry_adapters, with_registry_base

    return with_registry_adapters(with_registry_base(build_serving_config(config, overrides)))


def model_overrides(base: str | None, adapter: list[str] | None, adapters: str | None, storage: str | None) -> dict:
    """The flags of the shared options, as ServingConfig overrides."""
    return {
        "base": base,
        "adapters": _pairs(adapter),
        "registry_adapters": split_list(adapters),
        "storage": storage,
    }


def _pairs(values: list[str] | None) -> dict[str, str]:
    pairs, problems = {}, []
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            problems.append(Problem(f"--adapter {value}", "expected NAME=PATH"))
            continue
        pairs[name.strip()] = path.strip()
    if problems:
        raise ConfigError("command line", problems)
    return pairs


def serve(
    engine: str = typer.Option(None, "--engine", help="cpu (transformers + PEFT, here) or vllm (exec vllm serve)."),
    base: str = BaseOption,
    adapter: list[str] = AdapterOption,
    adapters: str = AdaptersOption,
    storage: str = StorageOption,
    adapter_root: list[str] = typer.Option(
        None, "--adapter-root", help="Folder adapters may be loaded from (default: storage + startup dirs)."
    ),
    served_model_name: str = typer.Option(None, "--served-model-name", help="The base model's id in the API."),
    host: str = typer.Option(None, "--host", help="Interface to listen on (default 127.0.0.1)."),
    port: int = typer.Option(None, "--port", help="TCP port (default 8000)."),
    api_key: str = typer.Option(
        None, "--api-key", envvar="LORAFLEET_API_KEY", help="Require this bearer token (env LORAFLEET_API_KEY)."
    ),
    config: Path = ConfigOption,
    max_batch_size: int = typer.Option(None, "--max-batch-size", help="Sequences decoded together (CPU engine)."),
    max_queue: int = typer.Option(None, "--max-queue", help="Requests waiting beyond the batch; more get 429."),
    max_loras: int = typer.Option(None, "--max-loras", help="Distinct adapters in one batch."),
    max_lora_rank: int = typer.Option(None, "--max-lora-rank", help="Highest adapter rank (vLLM's choices)."),
    max_cpu_loras: int = typer.Option(None, "--max-cpu-loras", help="Adapters held in CPU memory (>= max-loras)."),
    max_model_len: int = typer.Option(None, "--max-model-len", help="Context length (default: the model's)."),
    dtype: str = typer.Option(None, "--dtype", help="Weights' dtype: auto, float32, bfloat16 or float16."),
    max_n: int = typer.Option(None, "--max-n", help="Most choices (n) one request may ask (CPU engine)."),
    log_level: str = typer.Option(None, "--log-level", help="error, warning (no per-request lines), info (default)."),
    quantization: str = typer.Option(None, "--quantization", help="CPU engine: int8|int4 base weights (at load)."),
    print_command: bool = typer.Option(False, "--print-command", help="vllm engine: print the command and exit."),
    vllm_python: str = typer.Option(
        None, "--vllm-python", help="vllm engine: the Python of a vLLM install (default: see docs/serving.md)."
    ),
) -> None:
    """Serve a base model and its adapters behind vLLM's OpenAI-compatible API."""
    overrides = {
        "engine": engine,
        **model_overrides(base, adapter, adapters, storage),
        "adapter_roots": adapter_root or [],
        "served_model_name": served_model_name,
        "host": host,
        "port": port,
        "api_key": api_key,
        "max_batch_size": max_batch_size,
        "max_queue": max_queue,
        "max_loras": max_loras,
        "max_lora_rank": max_lora_rank,
        "max_cpu_loras": max_cpu_loras,
        "max_model_len": max_model_len,
        "vllm_python": vllm_python,
        "dtype": dtype,
        "max_n": max_n,
        "log_level": log_level,
        "quantization": quantization,
    }
    settings = serving_settings(config, overrides)
    if settings.engine == "vllm":
        _serve_vllm(settings, print_command)
        return
    if print_command:
        raise ConfigError("command line", [Problem("--print-command", "only meaningful with --engine vllm")])
    _serve_cpu(settings)


def _serve_vllm(settings, print_command: bool) -> None:
    from lorafleet.serving.vllm import check_adapters_for_vllm, exec_vllm, render_vllm_command

    if print_command:
        typer.echo(shlex.join(render_vllm_command(settings)))
        return
    check_adapters_for_vllm(settings)
    exec_vllm(settings)


def _serve_cpu(settings) -> None:
    from lorafleet.serving.app import create_app
    from lorafleet.serving.engine import CPUEngine
    from lorafleet.serving.server import serve_forever

    engine = CPUEngine(settings)
    engine.start()  # model and startup adapters load here, so their errors exit cleanly before listening
    names = ", ".join(a.name for a in engine.adapters()) or "none"
    typer.echo(engine.describe_settings(), err=True)
    typer.echo(f"serving {settings.model_id} (adapters: {names}) on http://{settings.host}:{settings.port}", err=True)
    serve_forever(create_app(settings, engine), settings)
