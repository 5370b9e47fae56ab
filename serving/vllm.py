"""The vLLM engine: render the `vllm serve` command for a ServingConfig, and exec it.

    lorafleet serve --engine vllm --base meta-llama/Llama-3.1-8B-Instruct --adapter pricing=/adapters/pricing/v3 \
        --max-loras 4 --print-command

Flag order is fixed (the Helm chart renders the same argv, in the same order):

    vllm serve BASE --host H --port P --enable-lora [--lora-modules NAME=PATH ...] --max-loras N
        --max-lora-rank R [--max-cpu-loras C] [--served-model-name ID] [--max-model-len L] [--dtype D]
        [--quantization Q] [VLLM_ARGS...]

Facts checked against vLLM 0.33.0's source (vllm/engine/arg_utils.py, vllm/config/lora.py,
vllm/entrypoints/common/cli_args.py, vllm/envs.py):
- `--lora-modules` takes several values after one flag (nargs="+"); repeating the flag keeps only the last one,
  so every adapter goes after a single `--lora-modules`. Values are `name=path`, or JSON
  `{"name", "path", "base_model_name"}` (used here when the path holds a ',', which the short form can't carry).
- `--max-lora-rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16); `--max-loras` >= 1 (default 1);
  `--max-cpu-loras` >= max-loras (default: max-loras); `--dtype` auto|half|float16|bfloat16|float|float32.
- `--quantization` is one of vLLM's QuantizationMethods (vllm/model_executor/layers/quantization/__init__.py);
  for a pre-quantized folder it must equal its config.json `quantization_config.quant_method`
  (`compressed-tensors` for `lorafleet quantize` folders, whose W4A16 / W8A16 / W8A8 int8 schemes vLLM runs
  with LoRA enabled). vLLM does not round an unquantized model to int8/int4 itself.
- `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` exist only with `VLLM_ALLOW_RUNTIME_LORA_UPDATING` set to
  1/true. The API key travels as `VLLM_API_KEY` (read when `--api-key` is absent), so it never shows in `ps` or
  in `--print-command`; vLLM guards /v1/* with it (not /health, not /metrics).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.serving.config import ServingConfig

VLLM_VERSION = "0.33.0"
# The --quantization choices of vLLM that load a checkpoint as its config.json describes it.
VLLM_CHECKPOINT_QUANTIZATIONS = ("compressed-tensors", "gptq", "gptq_marlin", "awq", "awq_marlin", "fp8", "gguf")


class VllmNotInstalled(LorafleetError):
    exit_code = 2


def base_argument(config: ServingConfig) -> str:
    """What vLLM loads: a builtin model's provisioned folder, anything else verbatim (a pod path or a hub id)."""
    from lorafleet.models import is_builtin, resolve_model

    return resolve_model(config.base, provision=False) if is_builtin(config.base) else config.base


def lora_module(name: str, path: str) -> str:
    if "," in path:
        return json.dumps({"name": name, "path": path}, separators=(",", ":"))
    return f"{name}={path}"


def render_vllm_command(config: ServingConfig) -> list[str]:
    """The `vllm serve` argv for `config` (pure: reads no files but a builtin base's cache folder)."""
    base = base_argument(config)
    argv = ["vllm", "serve", base, "--host", config.host, "--port", str(config.port), "--enable-lora"]
    if config.adapters:
        argv += ["--lora-modules", *(lora_module(name, path) for name, path in sorted(config.adapters.items()))]
    argv += ["--max-loras", str(config.max_loras), "--max-lora-rank", str(config.max_lora_rank)]
    if config.max_cpu_loras is not None:
        argv += ["--max-cpu-loras", str(config.max_cpu_loras)]
    if config.model_id != base:
        argv += ["--served-model-name", config.model_id]
    if config.max_model_len is not None:
        argv += ["--max-model-len", str(config.max_model_len)]
    if config.dtype != "auto":
        argv += ["--dtype", config.dtype]
    argv += quantization_flags(config, base)
    return argv + list(config.vllm_args)


def quantization_flags(config: ServingConfig, base: str) -> list[str]:
    """`--quantization METHOD` for a quantized base folder readable here; int8/int4 on a float base is an error."""
    from lorafleet.quantization.checkpoint import folder_quantization

    stored = (folder_quantization(base) or {}).get("quant_method") if os.path.isdir(base) else None
    if stored is None:
        if config.quantization in ("int8", "int4"):
            raise LorafleetError(
                f"--quantization {config.quantization} with --engine vllm: vLLM serves quantized checkpoints; "
                f"run `lorafleet quantize {config.base} --method {config.quantization} --out DIR` and serve DIR"
            )
        return []
    if stored not in VLLM_CHECKPOINT_QUANTIZATIONS:
        raise LorafleetError(f"{base}: quant_method {stored!r} is not one vLLM {VLLM_VERSION} loads")
    return ["--quantization", stored]


def vllm_environment(config: ServingConfig) -> dict[str, str]:
    """Environment variables to add for vLLM (runtime adapter loading, the API key)."""
    env = {}
    if config.runtime_lora_updating:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if config.api_key:
        env["VLLM_API_KEY"] = config.api_key
    return env


VLLM_PYTHON_ENV = "LORAFLEET_VLLM_PYTHON"
VLLM_VENV = ".venv-vllm"  # what `make vllm` creates beside the project's .venv
# `vllm serve` as a module: the CPU build's `vllm` console script looks up a distribution named `vllm`, which
# it is not, while this entry point takes the same flags (the model as --model).
VLLM_MODULE = "vllm.entrypoints.openai.api_server"


def vllm_launcher(config: ServingConfig) -> list[str]:
    """What runs `vllm serve`: `--vllm-python` (or `vllm_python`), then $LORAFLEET_VLLM_PYTHON, then `vllm` on
    PATH (a production image, a GPU machine), then the `.venv-vllm` that `make vllm` makes beside this venv."""
    explicit = config.vllm_python or os.environ.get(VLLM_PYTHON_ENV)
    if explicit:
        if not os.access(explicit, os.X_OK):
            source = "--vllm-python" if config.vllm_python else f"${VLLM_PYTHON_ENV}"
            raise VllmNotInstalled(f"{source} is {explicit}, which is not an executable Python")
        return [explicit, "-m", VLLM_MODULE]
    if shutil.which("vllm") is not None:
        return ["vllm", "serve"]
    beside = Path(sys.prefix).parent / VLLM_VENV / "bin" / "python"
    if beside.is_file():
        return [str(beside), "-m", VLLM_MODULE]
    raise VllmNotInstalled(
        f"vLLM is not installed here: no --vllm-python, no ${VLLM_PYTHON_ENV}, no `vllm` on PATH and no {beside}; "
        f"run `make vllm` (vLLM's CPU build in {VLLM_VENV}), `pip install vllm=={VLLM_VERSION}` on a GPU machine, "
        "or serve with the CPU engine: `lorafleet serve --engine cpu ...`"
    )


def vllm_process_command(config: ServingConfig) -> list[str]:
    """The argv that starts vLLM here: the rendered `vllm serve BASE ...` argv, run by the launcher found (the
    module form takes the base as `--model`: only `vllm serve` maps its positional model onto it)."""
    argv = render_vllm_command(config)
    launcher = vllm_launcher(config)
    return argv if launcher == argv[:2] else [*launcher, "--model", argv[2], *argv[3:]]


def check_adapters_for_vllm(config: ServingConfig) -> None:
    """Refuse, before vLLM starts, what it would refuse at start-up with a longer message (or serve wrongly):
    an adapter that is not plain LoRA, a rank above --max-lora-rank, configs and weights the registry's own
    checks refuse. Each problem names the adapter and its folder."""
    from lorafleet.registry import ServingProfile, check_adapter_against_profile

    problems = []
    for name, path in sorted(config.adapters.items()):
        if not os.path.isdir(path):  # a path inside the serving pod: vLLM reports it there
            continue
        profile = ServingProfile(base_model=base_argument(config), engine="vllm", max_lora_rank=config.max_lora_rank)
        reasons = [r for r in check_adapter_against_profile(path, profile) if not r.startswith("base model")]
        problems += [f"adapter {name} ({path}): {reason}" for reason in reasons]
    if problems:
        raise VllmRefusesAdapter("vLLM would not serve these adapters:\n  - " + "\n  - ".join(problems))


class VllmRefusesAdapter(LorafleetError):
    exit_code = 2


def exec_vllm(config: ServingConfig) -> None:
    """Replace this process with vLLM (never returns), or explain how to get it."""
    argv = vllm_process_command(config)
    os.execvpe(argv[0], argv, {**os.environ, **vllm_environment(config)})
