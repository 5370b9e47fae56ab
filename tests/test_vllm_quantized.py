"""A `lorafleet quantize` folder on the pinned vLLM (the CPU build in .venv-vllm), LoRA enabled.

The rendered flags are handed to vLLM's own argument parser and model config (which load the folder's
config.json and refuse a `--quantization` that contradicts it); then one real vLLM serves SmolLM2-135M quantized
to int4 with a LoRA adapter on top, through the official `openai` client.

On vLLM's CPU build (measured with 0.32): int4 and gptq-w4a16 folders run on its CPUWNA16 kernel with LoRA;
int8 weight-only has no CPU kernel ("uint8b128 not supported by CPUWNA16") and w8a8 with LoRA stops at start
(its int8 layer keeps no `weight` for the LoRA wrapper); on GPUs vLLM runs all four (docs/quantization.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from lorafleet.serving.testing import make_adapter
from tests.helpers import run_cli
from tests.test_vllm_serving import _free_port, running_vllm

BASE = "builtin:smollm2-135m-instruct"
VLLM_PYTHON = Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"
CHECK_WITH_VLLM = """
import json, sys
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])
try:
    config = AsyncEngineArgs.from_cli_args(args).create_model_config()
except Exception as exc:
    print(json.dumps({"refused": str(exc)}))
else:
    print(json.dumps({"quantization": config.quantization, "enable_lora": args.enable_lora}))
"""


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory) -> Path:
    from lorafleet.training.quantize import QuantizeSettings, quantize_model

    out = tmp_path_factory.mktemp("vllm-quantized") / "smollm2-int4"
    return quantize_model(BASE, QuantizeSettings(method="int4", out=out)).out_dir


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    from lorafleet.models import resolve_model

    return make_adapter(resolve_model(BASE), tmp_path_factory.mktemp("vllm-q-adapter") / "a", "lora-all", seed=1)


def vllm_verdict(argv: list[str]) -> dict:
    """What the pinned vLLM's parser and model config make of `vllm serve MODEL ARGS...` (argv as rendered)."""
    args = [*argv[3:], "--model", argv[2], "--max-model-len", "512"]
    result = subprocess.run([str(VLLM_PYTHON), "-c", CHECK_WITH_VLLM, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_rendered_flags_are_what_the_pinned_vllm_accepts_for_the_folder(int4_folder, adapter) -> None:
    result = run_cli("serve", "--engine", "vllm", "--base", str(int4_folder), "--adapter", f"a={adapter}",
                     "--print-command")  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = result.stdout.split()
    assert argv[argv.index("--quantization") + 1] == "compressed-tensors" and "--enable-lora" in argv
    assert vllm_verdict(argv) == {"quantization": "compressed-tensors", "enable_lora": True}
    wrong = [*argv[:-1], "gptq"]  # the check can fail: vLLM refuses a method the folder does not hold
    assert "does not match" in vllm_verdict(wrong)["refused"]


def test_int4_on_a_float_base_is_refused_for_vllm_with_the_command_to_run() -> None:
    result = run_cli("serve", "--engine", "vllm", "--base", BASE, "--quantization", "int4", "--print-command")
    assert result.returncode != 0 and "lorafleet quantize" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # a real vLLM start: ~30-60 s on 2 cores
def test_vllm_serves_the_int4_folder_with_a_lora_adapter(int4_folder, adapter, tmp_path) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "lorafleet", "serve", "--engine", "vllm", "--base", str(int4_folder),
               "--adapter", f"a={adapter}", "--port", str(port), "--max-model-len", "512"]  # fmt: skip
    with running_vllm(command, port, tmp_path / "vllm.log", env=None) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answers = {
            model: client.completions.create(
                model=model, prompt="The capital of France is", max_tokens=8, temperature=0
            )
            .choices[0]
            .text
            for model in (str(int4_folder), "a")
        }
        base, tuned = answers[str(int4_folder)], answers["a"]
    log = (tmp_path / "vllm.log").read_text()
    assert "CompressedTensorsWNA16" in log, "vLLM ran the folder on its int4 kernel"
    assert "Paris" in base, base
    assert tuned != base, "the adapter changes the quantized base's answer"
