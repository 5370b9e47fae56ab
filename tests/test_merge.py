"""`lorafleet merge`: the merged folder reproduces base + adapter, for every mergeable method and dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafleet.config import JobConfig
from lorafleet.runs import RunFolder, RunRecord
from tests.helpers import run_cli

INPUT_IDS = torch.tensor([[1, 40, 77, 90, 120, 33, 200, 7, 64, 5], [3, 9, 27, 81, 243, 100, 50, 25, 12, 6]])


METHOD_KNOBS = {  # each adapter section takes only its own method's knobs
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "dora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "prefix_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4},
    "prompt_tuning": {"num_virtual_tokens": 4},
}


def make_run(
    storage: Path,
    method: str,
    *,
    quantization: str = "none",
    base: str = "builtin:tiny-llama",
    data: dict | None = None,
    random_adapter: bool = True,
) -> Path:
    """A run folder as the launcher leaves it, with a randomly initialised (so non-identity) adapter unless
    `random_adapter` is False (LoRA's own init: B = 0, the base's outputs)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafleet.models import resolve_model
    from lorafleet.training.adapters import PEFT_CONFIG_BUILDERS
    from lorafleet.training.model import load_tokenizer

    job = JobConfig.model_validate(
        {
            "name": f"merge-{method.replace('_', '-')}",
            "model": {"name_or_path": base, "quantization": quantization},
            "adapter": {"method": method, **METHOD_KNOBS.get(method, {})},
            "data": data or {"train": "builtin:price"},
            "distributed": {"num_workers": 1, "use_gpu": quantization != "none"},
            "storage": {"uri": str(storage)},
        }
    )
    run_dir = storage / "runs" / f"{job.name}-{quantization}"
    base = AutoModelForCausalLM.from_pretrained(resolve_model(job.model.name_or_path))
    config = PEFT_CONFIG_BUILDERS[method](job.adapter, base)
    if method in ("lora", "dora") and random_adapter:
        config.init_lora_weights = False  # random B: the adapter changes the output
    if method == "ia3":
        config.init_ia3_weights = False
    torch.manual_seed(1)
    model = get_peft_model(base, config)
    model.save_pretrained(run_dir / "adapter")
    load_tokenizer(job.model).save_pretrained(run_dir / "adapter")
    config_path = run_dir / "adapter" / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text()) | {"base_model_name_or_path": job.model.name_or_path}
    config_path.write_text(json.dumps(adapter_config))
    folder = RunFolder(str(run_dir))
    folder.write_config(job)
    folder.write_record(RunRecord(run_id=run_dir.name, status="succeeded"))
    return run_dir


def reference_logits(run_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(base + adapter, base alone) logits with plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafleet.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-llama"), dtype=dtype)
    with torch.no_grad():
        alone = base(INPUT_IDS).logits.float()
        adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter"))(INPUT_IDS).logits.float()
    return adapted, alone


def merged_logits(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    with torch.no_grad():
        return model(INPUT_IDS).logits.float()


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_fp32_merge_reproduces_base_plus_adapter(tmp_path: Path, method: str) -> None:
    from lorafleet.runs import open_run
    from lorafleet.training.merge import merge_run

    run_dir = make_run(tmp_path, method)
    summary = merge_run(open_run(run_dir), tmp_path / "merged", dtype="fp32")
    expected, base_only = reference_logits(run_dir)
    got = merged_logits(tmp_path / "merged")
    assert (expected - base_only).abs().max() > 1e-3, "the adapter changes nothing: the test would prove nothing"
    assert (got - expected).abs().max().item() < 1e-4
    assert summary.max_abs_logit_diff < 1e-4 and summary.method == method
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md"} <= files
    assert any(name.endswith(".safetensors") for name in files) and "adapter_config.json" not in files
    assert not [name for name in (p.name for p in tmp_path.iterdir()) if name.startswith(".merged.")], "staging left"


def test_bf16_merge_via_cli_is_sharded_and_within_bf16_tolerance(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "lora")
    out = tmp_path / "price-merged"
    result = run_cli("merge", str(run_dir), "--out", str(out), "--dtype", "bf16", "--max-shard-size", "100KB")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merged lora adapter" in result.stdout, result.stdout
    assert "Setting accelerator" not in result.stdout + result.stderr, "DeepSpeed's import notice stays quiet"
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    expected_bf16, _ = reference_logits(run_dir, torch.bfloat16)
    expected_fp32, base_only = reference_logits(run_dir)
    got = merged_logits(out, torch.bfloat16)
    tolerance = 0.05 * max(1.0, expected_fp32.abs().max().item())  # bf16 keeps ~3 significant digits
    assert (expected_fp32 - base_only).abs().max().item() > 4 * tolerance, "too weak an adapter to tell"
    assert (got - expected_bf16).abs().max().item() <= tolerance
    assert (got - expected_fp32).abs().max().item() <= tolerance


def test_model_card_names_base_method_data_hash_and_metrics(tmp_path: Path) -> None:
    from lorafleet.runs import data_hash, open_run
    from lorafleet.training.merge import merge_run

    run_dir = make_run(tmp_path, "lora")
    report = {
        "task": "numeric",
        "n": 3,
        "data": {"source": "builtin:price/test"},
        "base": {"loss": 2.5, "mae": 80.0},
        "finetuned": {"loss": 1.2, "mae": 20.5},
    }
    (run_dir / "report").mkdir()
    (run_dir / "report" / "eval.json").write_text(json.dumps(report))
    run = open_run(run_dir)
    merge_run(run, tmp_path / "merged", dtype="fp32")
    card = (tmp_path / "merged" / "README.md").read_text()
    digest = data_hash(run)
    assert digest and len(digest) == 64
    for piece in (
        "base_model: builtin:tiny-llama",
        "**Method**: lora (r=4",
        "merge_and_unload",
        digest,
        "| mae | 80 | 20.5 |",
        "| loss | 2.5 | 1.2 |",
        run_dir.name,
    ):
        assert piece in card, piece


def test_qlora_runs_merge_into_the_unquantized_base(tmp_path: Path) -> None:
    from lorafleet.runs import open_run
    from lorafleet.training.merge import merge_run

    run_dir = make_run(tmp_path, "lora", quantization="4bit")  # no bitsandbytes or GPU needed to merge
    merge_run(open_run(run_dir), tmp_path / "merged", dtype="fp32")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (merged_logits(tmp_path / "merged") - reference_logits(run_dir)[0]).abs().max().item() < 1e-4
    assert "QLoRA" in (tmp_path / "merged" / "README.md").read_text()


def test_prefix_tuning_cannot_be_merged(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "prefix_tuning")
    result = run_cli("merge", str(run_dir), "--out", str(tmp_path / "merged"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "prefix_tuning cannot be merged" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "merged").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path) -> None:
    from lorafleet.runs import open_run
    from lorafleet.training.merge import MergeError, merge_run

    run = open_run(make_run(tmp_path, "lora"))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists"):
        merge_run(run, out, dtype="fp32")
    assert (out / "keep.txt").is_file()
    merge_run(run, out, dtype="fp32", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "runs"]


def test_default_output_is_the_runs_merged_folder_by_run_id(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "lora")
    result = run_cli("merge", run_dir.name, "--storage", str(tmp_path), "--dtype", "fp32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "merged" / "config.json").is_file()
