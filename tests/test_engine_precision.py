"""The CPU engine in bfloat16, and the settings it chooses for the machine (dtype `auto`, `max_batch_size` unset).

bf16: the base's linear weights packed in bf16, LoRA stacks in fp32 on top, KV and prefix cache in bf16. Every
row of a mixed batch of every method stays within a stated tolerance of PEFT's fp32 forward: the largest logit
difference below BF16_MAX_LOGIT_GAP and the same top-1 token at no fewer than BF16_TOP1_AGREEMENT of the steps.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorafleet import precision
from lorafleet.serving import machine_defaults
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.engine import CPUEngine
from lorafleet.serving.engine_api import SamplingParams
from tests.test_serving_engine import (
    KINDS,
    PROMPTS,
    adapters_of_every_kind,
    compare_with_references,
    record_logits,
    run_many,
)

BF16_MAX_LOGIT_GAP = 0.05  # the tiny model's logits span about ±1; bf16 keeps ~3 significant digits
BF16_TOP1_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return adapters_of_every_kind(tiny_model_dir, tmp_path_factory.mktemp("bf16-adapters"))


def start_engine(tiny_model_dir: str, adapter_dir: Path | None = None, **settings) -> CPUEngine:
    adapters = {name: str(adapter_dir / name) for name in KINDS} if adapter_dir else {}
    config = ServingConfig(
        base=tiny_model_dir, served_model_name="tiny", adapters=adapters, max_loras=8, torch_threads=1, **settings
    )
    engine = CPUEngine(config)
    engine.start()
    return engine


def peft_references(tiny_model_dir: str, adapter_dir: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()  # noqa: E731
    loras = PeftModel.from_pretrained(base(), adapter_dir / "a", "a")
    for name in ("b", "d"):
        loras.load_adapter(adapter_dir / name, name)
    references = {"tiny": base(), **{name: loras.eval() for name in ("a", "b", "d")}}
    prompt_learning = ("pt", "px", "pe")
    return references | {name: PeftModel.from_pretrained(base(), adapter_dir / name).eval() for name in prompt_learning}


def test_bf16_mixed_batch_of_every_method_stays_close_to_peft_fp32(tiny_model_dir, adapter_dir) -> None:
    """Measured here: largest logit gap 0.005, top-1 the same at every step."""
    engine = start_engine(tiny_model_dir, adapter_dir, dtype="bfloat16", max_batch_size=16)
    try:
        assert engine.model.lm_head.weight.dtype == torch.bfloat16
        assert type(engine.model.lm_head).__name__ == "PackedLinear", "bf16 weights are packed too"
        seen, restore = record_logits(engine)
        try:
            params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
            models = ["a", "b", "pt", "px", "pe", "tiny", "d", "a", "tiny"]
            jobs = [(PROMPTS[i % len(PROMPTS)], model, params, 0.02 * (i % 3)) for i, model in enumerate(models)]
            run_many(engine, jobs)
        finally:
            restore()
        stacked = [p for name, p in engine.model.named_parameters() if "lora_A" in name]
        assert stacked and {p.dtype for p in stacked} == {torch.float32}, "LoRA weights stay fp32 over a bf16 base"
        run_many(engine, [("a long prompt that fills whole prefix-cache blocks " * 6, "a", params, 0)])
        blocks = list(engine.runner.prefixes._blocks.values())
        assert blocks and {t.dtype for block in blocks for k, v in block for t in (k, v)} == {torch.bfloat16}
    finally:
        engine.shutdown()
    assert sorted(entry[0] for entry in seen.values()) == sorted(models)
    gap, agreement = compare_with_references(seen, peft_references(tiny_model_dir, adapter_dir))
    assert gap < BF16_MAX_LOGIT_GAP and agreement >= BF16_TOP1_AGREEMENT, (gap, agreement)


@pytest.mark.parametrize(("native", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_auto_follows_the_cpu_and_is_printed(tiny_model_dir, monkeypatch, native: bool, dtype) -> None:
    monkeypatch.setenv(precision.OVERRIDE_VARIABLE, "1" if native else "0")
    precision.cpu_bf16.cache_clear()
    engine = start_engine(tiny_model_dir)
    try:
        assert engine.dtype == dtype and engine.model.lm_head.weight.dtype == dtype
        described = engine.describe_settings()
        assert described.startswith(f"dtype {str(dtype).removeprefix('torch.')} (auto: ")
        assert "max_batch_size " in described and "available" in described
    finally:
        engine.shutdown()
        precision.cpu_bf16.cache_clear()


def test_batch_size_follows_memory_and_the_model() -> None:
    config = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, num_attention_heads=9, hidden_size=576)
    per_token = machine_defaults.kv_bytes_per_token(config, torch.float32)
    assert per_token == 2 * 30 * 3 * 64 * 4
    gib = 2**30
    roomy = machine_defaults.batch_size(config, torch.float32, 2048, available=64 * gib)
    assert roomy.value == machine_defaults.MAX_AUTO_BATCH and "at most 64" in roomy.reason
    tight = machine_defaults.batch_size(config, torch.float32, 8192, available=4 * gib)
    assert tight.value == int(0.5 * 4 * gib // (per_token * 8192)) == 5
    assert machine_defaults.batch_size(config, torch.bfloat16, 8192, available=4 * gib).value == 11  # half the KV
    assert machine_defaults.batch_size(config, torch.float32, 8192, available=1).value == 1
    assert 0 < machine_defaults.available_memory() < 2**50


def test_an_explicit_batch_size_wins_and_bounds_n(tiny_model_dir) -> None:
    engine = start_engine(tiny_model_dir, max_batch_size=3, dtype="float32")
    try:
        assert engine.max_batch_size == engine.scheduler.max_batch_size == 3
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 1e6
        assert engine.weights_mb > weights, "the packed copies of the linear weights are counted too"
        assert engine.describe_settings() == (
            "dtype float32 (set explicitly); max_batch_size 3 (set explicitly); "
            f"base weights not quantized ({engine.weights_mb:.1f} MB)"
        )
    finally:
        engine.shutdown()
