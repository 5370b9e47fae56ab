"""`lorafleet quantize` and the CPU engine's quantized base, on the tiny model.

Each method writes a compressed-tensors folder (the format vLLM loads); the CPU engine serves it, and a float base
with `--quantization int8|int4`, with LoRA adapters in full precision on top. Stated tolerances, against PEFT on
the float32 base (measured values in the test docstrings):
- 8-bit (int8, w8a8): largest logit gap below EIGHT_BIT_MAX_GAP, the same top-1 token at every step;
- 4-bit (int4, gptq-w4a16): perplexity of the quantized model within FOUR_BIT_MAX_PPL_RATIO of the float one (a
  random tiny model's logits are near-ties, so top-1 agreement says little there; on real text SmolLM2's slow
  test in tests/test_quantize_report.py measures each method's perplexity);
- every method: the engine reproduces the quantized model itself (PEFT on the folder loaded dense) to
  KERNEL_MAX_GAP, the cost of its int8 matmul kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
from safetensors import safe_open

from lorafleet.serving.app import create_app
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.engine import CPUEngine
from lorafleet.serving.engine_api import SamplingParams
from lorafleet.serving.server import ServerThread
from tests.helpers import run_cli, two_adapters
from tests.test_merge import make_run
from tests.test_serving_engine import PROMPTS, compare_with_references, record_logits, run_many

METHODS = ("int8", "int4", "gptq-w4a16", "w8a8")
EIGHT_BIT_MAX_GAP = 0.1
FOUR_BIT_MAX_PPL_RATIO = 1.05
KERNEL_MAX_GAP = 0.1
TEXT = "The quick brown fox jumps over the lazy dog while the price of bread rises by three cents a day."
CALIBRATION_ROWS = [
    {"instruction": "Say hello", "output": "Hello there, friend."},
    {"instruction": "Count to five", "output": "one two three four five"},
    {"instruction": "Name a colour", "output": "blue, like the sky"},
    {"instruction": "What is the price of a loaf?", "output": "About three dollars."},
]


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CALIBRATION_ROWS))
    return path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, calibration_file) -> dict[str, Path]:
    """The tiny base quantized by every method (in-process; the CLI is exercised below)."""
    from lorafleet.training.quantize import QuantizeSettings, quantize_model

    root = tmp_path_factory.mktemp("quantized")
    folders = {}
    for method in METHODS:
        calibration = str(calibration_file) if method == "gptq-w4a16" else None
        settings = QuantizeSettings(method=method, out=root / method, calibration=calibration)
        folders[method] = quantize_model("builtin:tiny-llama", settings).out_dir
    return folders


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return two_adapters(tiny_model_dir, tmp_path_factory.mktemp("quantize-adapters"))


def peft_on(base_dir: str | Path, adapter_dir: Path) -> dict:
    """Reference models on `base_dir` loaded dense in float32: the base, and adapters a and b."""
    from peft import PeftModel

    from lorafleet.model_loading import load_base_model_weights

    base = lambda: load_base_model_weights(str(base_dir), dtype=torch.float32).eval()  # noqa: E731
    loras = PeftModel.from_pretrained(base(), adapter_dir / "a", "a")
    loras.load_adapter(adapter_dir / "b", "b")
    return {"tiny": base(), "a": loras.eval(), "b": loras}


def serve_mixed_batch(base: str | Path, adapter_dir: Path, **settings) -> tuple[CPUEngine, dict]:
    config = ServingConfig(
        base=str(base),
        served_model_name="tiny",
        adapters={"a": str(adapter_dir / "a"), "b": str(adapter_dir / "b")},
        max_loras=4,
        torch_threads=1,
        dtype="float32",
        **settings,
    )
    engine = CPUEngine(config)
    engine.start()
    seen, restore = record_logits(engine)
    try:
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        models = ["a", "b", "tiny", "a", "b", "tiny"]
        run_many(engine, [(PROMPTS[i % len(PROMPTS)], model, params, 0.0) for i, model in enumerate(models)])
    finally:
        restore()
    return engine, seen


def int8_layers(engine: CPUEngine) -> list:
    return [module for module in engine.model.modules() if type(module).__name__ == "Int8Linear"]


def perplexity_of(model_dir: str | Path) -> float:
    from lorafleet.model_loading import load_base_model_weights, load_base_tokenizer
    from lorafleet.training.quantize import perplexity

    ids = load_base_tokenizer(str(model_dir))(TEXT)["input_ids"]
    return perplexity(load_base_model_weights(str(model_dir), dtype=torch.float32).eval(), [(ids, ids)])


@pytest.mark.parametrize("method", METHODS)
def test_folder_is_compressed_tensors_with_the_expected_integers(quantized, method) -> None:
    folder = quantized[method]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    group = config["config_groups"]["group_0"]
    bits = 8 if method in ("int8", "w8a8") else 4
    assert group["weights"]["num_bits"] == bits and group["weights"]["symmetric"] is True
    assert (group["input_activations"] is not None) == (method == "w8a8")
    record = json.loads((folder / "lorafleet-quantization.json").read_text())
    assert record["method"] == method and record["base_model"] == "builtin:tiny-llama"
    with safe_open(folder / "model.safetensors", "pt") as tensors:
        names = set(tensors.keys())
        if method == "w8a8":
            weight = tensors.get_tensor("model.layers.0.mlp.down_proj.weight")
            assert weight.dtype == torch.int8 and weight.shape == (64, 128)
        else:  # int32 words of 32 / bits values each
            packed = tensors.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
            assert packed.dtype == torch.int32 and packed.shape == (64, 128 * bits // 32)
        assert "lm_head.weight" in names and "model.layers.0.mlp.down_proj.weight_scale" in names
    assert (record["calibration"] is not None) == (method == "gptq-w4a16")


@pytest.mark.parametrize("method", METHODS)
def test_engine_serves_each_method_with_adapters_within_tolerance(
    quantized, adapter_dir, tiny_model_dir, method
) -> None:
    """Measured: 8-bit gap 0.036, top-1 100%; 4-bit perplexity ratio 0.998-0.999; engine vs the folder <= 0.041."""
    engine, seen = serve_mixed_batch(quantized[method], adapter_dir)
    try:
        assert engine.quantization == method
        assert len(int8_layers(engine)) == 15, "every Linear of the base, the LM head included"
        assert f"base weights {method}" in engine.describe_settings()
    finally:
        engine.shutdown()
    kernel_gap, _ = compare_with_references(seen, peft_on(quantized[method], adapter_dir))
    gap, top1 = compare_with_references(seen, peft_on(tiny_model_dir, adapter_dir))
    print(f"{method}: kernel gap {kernel_gap:.4f}; vs float32 gap {gap:.4f} top-1 {top1:.3f}")
    assert kernel_gap < KERNEL_MAX_GAP, kernel_gap
    if method in ("int8", "w8a8"):
        assert gap < EIGHT_BIT_MAX_GAP and top1 == 1.0, (gap, top1)
    else:
        ratio = perplexity_of(quantized[method]) / perplexity_of(tiny_model_dir)
        print(f"{method}: perplexity ratio {ratio:.4f}")
        assert abs(ratio - 1) < FOUR_BIT_MAX_PPL_RATIO - 1, ratio


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_float_base_quantized_at_load(adapter_dir, tiny_model_dir, method) -> None:
    engine, seen = serve_mixed_batch(tiny_model_dir, adapter_dir, quantization=method)
    try:
        assert engine.quantization == method
        assert len(int8_layers(engine)) == 15
    finally:
        engine.shutdown()
    gap, top1 = compare_with_references(seen, peft_on(tiny_model_dir, adapter_dir))
    assert gap < (EIGHT_BIT_MAX_GAP if method == "int8" else 0.25), gap


def test_quantized_folder_answers_through_the_api_with_an_adapter(quantized, adapter_dir) -> None:
    config = ServingConfig(
        base=str(quantized["gptq-w4a16"]),
        served_model_name="tiny",
        adapters={"a": str(adapter_dir / "a"), "b": str(adapter_dir / "b")},
        max_model_len=256,
        torch_threads=1,
    )
    with ServerThread(create_app(config)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answers = {
            model: client.completions.create(
                model=model, prompt="Hello there", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
            ).choices[0]
            for model in ("tiny", "a", "b")
        }
    assert all(choice.text and choice.finish_reason == "length" for choice in answers.values())
    assert len({choice.text for choice in answers.values()}) > 1, "the adapters change the quantized base's answers"


def test_flag_that_contradicts_the_folder_is_refused(quantized, tiny_model_dir) -> None:
    from lorafleet.quantization.methods import QuantizationError

    engine = CPUEngine(ServingConfig(base=str(quantized["int4"]), quantization="int8", torch_threads=1))
    with pytest.raises(QuantizationError, match="holds int4 weights"):
        engine.start()


def test_cli_quantizes_a_run_with_its_own_training_rows_and_publish_records_it(tmp_path) -> None:
    """GPTQ calibrates on the run's own training data; publish --merged copies method, data hash and eval."""
    run_dir = make_run(tmp_path, "lora")
    out = tmp_path / "merged-w4a16"
    result = run_cli("quantize", str(run_dir), "--method", "gptq-w4a16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "calibrate" in result.stderr and "perplexity" in result.stdout
    record = json.loads((out / "lorafleet-quantization.json").read_text())
    assert record["run_id"] == run_dir.name and record["calibration"]["sequences"] > 0
    assert len(record["calibration"]["sha256"]) == 64
    assert 0.5 < record["eval"]["perplexity_ratio"] < 2
    published = run_cli("publish", str(out), "--name", "price-w4a16", "--merged", "--storage", str(tmp_path))
    assert published.returncode == 0, published.stderr
    manifest = json.loads(next((tmp_path / "models" / "price-w4a16").glob("v*/manifest.json")).read_text())
    assert manifest["method"] == "quantized-gptq-w4a16"
    assert manifest["quantization"]["calibration"]["sha256"] == record["calibration"]["sha256"]
    assert manifest["metrics"]["quantized_perplexity_ratio"] == record["eval"]["perplexity_ratio"]


def test_refusals_are_clear(tmp_path, quantized) -> None:
    prefix_run = make_run(tmp_path, "prefix_tuning")
    cases = {
        "prefix": (str(prefix_run), "int8", "prefix_tuning cannot be merged"),
        "unknown": ("builtin:tiny-llama", "int3", "unknown quantization method"),
        "no calibration": ("builtin:tiny-llama", "gptq-w4a16", "needs calibration data"),
        "twice": (str(quantized["int8"]), "int4", "already quantized"),
    }
    for case, (model, method, message) in cases.items():
        result = run_cli("quantize", model, "--method", method, "--out", str(tmp_path / case.replace(" ", "-")))
        assert result.returncode == 2 and message in result.stderr, (case, result.stderr)
        assert "Traceback" not in result.stderr and not (tmp_path / case.replace(" ", "-")).exists()

