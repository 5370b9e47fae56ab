"""`lorafleet eval RUN --compare ...`: every variant of the merged run measured as the CPU engine serves it, in
report/quantization.{json,md,png}; and on the demo's adapter for SmolLM2-135M (slow) the quality bounds the issue
states: int8 perplexity within 2% of fp32 and 4-bit within 10% on the demo's eval set, files smaller by the
expected ratio.
"""

from __future__ import annotations

import json
from typing import get_args

import pytest

from lorafleet.config import CompareVariant, JobConfig
from lorafleet.errors import ConfigError
from lorafleet.quantization.methods import METHODS
from tests.helpers import CONFIGS, run_cli
from tests.test_merge import make_run


def test_compare_variants_are_fp32_and_every_method() -> None:
    assert get_args(CompareVariant) == ("fp32", *METHODS)


def test_a_bad_compare_list_names_the_field() -> None:
    from lorafleet.training.evaluate import resolve_settings

    job = JobConfig.model_validate({"name": "j", "model": {"name_or_path": "x"}, "data": {"train": "builtin:price"}})
    with pytest.raises(ConfigError, match=r"eval\.compare"):
        resolve_settings(job, compare=["int3"])
    result = run_cli("eval", "nowhere", "--compare", "fp32,int3")
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_eval_compare_writes_one_table_and_plot(tmp_path) -> None:
    run_dir = make_run(tmp_path, "lora")
    result = run_cli(
        "eval", str(run_dir), "--compare", "int8,gptq-w4a16", "--max-examples", "6", "--max-new-tokens", "4"
    )
    assert result.returncode == 0, result.stderr
    assert "report " in result.stdout and "gptq-w4a16: perplexity" in result.stdout
    report_dir = run_dir / "report"
    report = json.loads((report_dir / "quantization.json").read_text())
    assert list(report["variants"]) == ["fp32", "int8", "gptq-w4a16"] and report["n"] == 6
    fp32, int8 = report["variants"]["fp32"], report["variants"]["int8"]
    assert fp32["quantization"] is None and int8["quantization"] == "int8"
    assert fp32["perplexity_ratio"] == 1.0 and abs(int8["perplexity_ratio"] - 1) < 0.02
    assert int8["weights_mb"] < 0.6 * fp32["weights_mb"] and int8["file_mb"] < fp32["file_mb"]
    for row in report["variants"].values():
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["peak_rss_mb"] > 100
        assert row["task_metrics"]["unparseable"] is not None, "answers were generated and scored"
    table = (report_dir / "quantization.md").read_text()
    assert "| int8 |" in table and "| gptq-w4a16 |" in table and "decode tok/s" in table
    assert (report_dir / "quantization.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("**/lorafleet-compare-*")), "the variants' folders are removed"


@pytest.mark.slow  # the demo's price adapter trained for 40 steps (~1.5 min), then four variants (~4-5 min)
def test_smollm2_demo_adapter_quantized_within_the_stated_perplexity(tmp_path) -> None:
    """On the demo eval set (64 held-out price rows), the demo's fine-tune merged into SmolLM2-135M and quantized:
    int8 within 2% of fp32's perplexity and 4-bit within 10%, files smaller by the expected ratio. Measured with
    the full demo adapter (130 steps): as stored int8 0.9997x, int4 1.034x, gptq-w4a16 1.007x; on the CPU
    engine's int8 arithmetic 1.005x / 1.033x / 1.017x (docs/quantization.md); with this 40-step one, as stored
    1.0015x / 1.035x / 1.002x, on the engine 1.007x / 1.044x / 1.003x."""
    from lorafleet.cli.quantization_probe import measure_in_child
    from lorafleet.runs import open_run
    from lorafleet.training.evaluate import resolve_settings
    from lorafleet.training.evaluate_quantization import compare_quantizations

    storage = tmp_path / "storage"
    overrides = ["--set", "training.max_steps=40", "--set", f"storage.uri={storage}", "--run-id", "demo-price"]
    trained = run_cli("train", str(CONFIGS / "demo.yaml"), *overrides, timeout=1200)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = open_run("demo-price", str(storage))
    settings = resolve_settings(run.job)  # the demo config's eval section: 64 examples
    rows = compare_quantizations(run, settings, ["fp32", "int8", "int4", "gptq-w4a16"], measure_in_child)["variants"]
    print(
        {name: (row["perplexity_stored_ratio"], row["perplexity_ratio"], row["file_mb"]) for name, row in rows.items()}
    )
    assert rows["int8"]["perplexity_stored_ratio"] < 1.02 and rows["int8"]["perplexity_ratio"] < 1.02
    for four_bit in ("int4", "gptq-w4a16"):
        assert rows[four_bit]["perplexity_stored_ratio"] < 1.10 and rows[four_bit]["perplexity_ratio"] < 1.10
    assert rows["gptq-w4a16"]["perplexity_stored"] < rows["int4"]["perplexity_stored"], "GPTQ beats rounding"
    # fp32 folder: 4 bytes a weight. Quantized: the 30 layers' linears at 1 (int8) or 0.5 (int4) byte plus
    # scales, the tied 49152 x 576 embedding in bf16 (2 bytes).
    embedding, linears = 49152 * 576, 30 * (576 * (576 + 192 + 192 + 576) + 3 * 576 * 1536)
    assert rows["fp32"]["file_mb"] == pytest.approx(4 * (embedding + linears) / 1e6, rel=0.02)
    assert rows["int8"]["file_mb"] == pytest.approx((2 * embedding + 1.0 * linears) / 1e6, rel=0.05)
    assert rows["int4"]["file_mb"] == pytest.approx((2 * embedding + 0.5 * linears) / 1e6, rel=0.08)
    assert rows["int8"]["weights_mb"] < 0.5 * rows["fp32"]["weights_mb"]
