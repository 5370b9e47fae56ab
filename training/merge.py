"""Merge a finished run's adapter into its base and save a plain HF model folder.

    lorafleet merge price-20250101-120000          # -> <run>/merged/ (bf16): what `publish --merged` takes
    lorafleet merge runs/price-20250101-120000 --out /models/price-merged --dtype fp32 --max-shard-size 2GB

The merged folder loads with `AutoModelForCausalLM.from_pretrained` alone (no PEFT): safetensors shards,
config.json, generation_config.json, the tokenizer, and a model card (README.md) with the base, the method,
the data hash and the eval metrics. It is written under a temporary name beside its target and renamed
into place, so a crash never leaves a half-written model behind that name.

QLoRA runs are merged into a full-precision base (loaded without quantization, i.e. dequantized) in the
requested dtype, never into 4-bit weights. Prompt-learning methods (prefix / P-tuning / prompt tuning) add
virtual tokens instead of a weight delta and cannot be merged: that is a clear error (exit code 2).
Before saving, the merged model is checked against base + adapter on a probe prompt (max |logit diff|).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lorafleet.errors import LorafleetError
from lorafleet.runs import FinishedRun, data_hash
from lorafleet.storage import staged_folder

MERGE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
UNMERGEABLE_PEFT_TYPES = ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT")
PROBE_TEXT = "Estimate the price of this product in US dollars: a large walnut bookshelf with storage drawers."
FP32_TOLERANCE = 1e-3  # relative to the largest logit: far above rounding noise, far below any adapter's effect


class MergeError(LorafleetError):
    """A run that cannot be merged as asked (method, target folder, base checkpoint)."""

    exit_code = 2


@dataclass(frozen=True)
class MergeSummary:
    out_dir: Path
    method: str
    dtype: str
    shards: int
    size_bytes: int
    max_abs_logit_diff: float
    adapter_effect: float  # max |logit diff| of base + adapter vs the base alone, for scale
    seconds: float


def merge_run(
    run: FinishedRun,
    out_dir: Path | None = None,
    *,
    dtype: str = "bf16",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> MergeSummary:
    """merge_and_unload the run's adapter into its base and save a plain HF model folder (atomically)."""
    from lorafleet.training.model import load_tokenizer

    started = time.monotonic()
    if dtype not in MERGE_DTYPES:
        raise MergeError(f"--dtype {dtype}: use one of {', '.join(MERGE_DTYPES)}")
    out_dir = Path(out_dir or run.merged_dir).expanduser().resolve()
    if out_dir.exists() and not overwrite:
        raise MergeError(f"{out_dir} already exists: pass --overwrite to replace it, or choose another --out")
    adapter_config = run.adapter_config()
    method = method_name(adapter_config)
    refuse_unmergeable(run, adapter_config, method)
    if run.job.model.quantization != "none":
        print(f"QLoRA run ({run.job.model.quantization}): merging into the unquantized base in {dtype}", flush=True)
    tokenizer = load_tokenizer(run.job.model)
    merged, checks = merge_checked(run, dtype, tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"])

    with staged_folder(out_dir) as staging:
        merged.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        if not (staging / "generation_config.json").is_file() and merged.generation_config is not None:
            merged.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        summary = MergeSummary(
            out_dir=out_dir,
            method=method,
            dtype=dtype,
            shards=len(list(staging.glob("*.safetensors"))),
            size_bytes=sum(p.stat().st_size for p in staging.glob("*.safetensors")),
            **checks,
            seconds=round(time.monotonic() - started, 1),
        )
        (staging / "README.md").write_text(model_card(run, adapter_config, summary))
    return summary


def refuse_unmergeable(run: FinishedRun, adapter_config: dict, method: str) -> None:
    from transformers import AutoConfig

    from lorafleet.models import resolve_model

    if str(adapter_config.get("peft_type", "")).upper() in UNMERGEABLE_PEFT_TYPES:
        raise MergeError(
            f"run {run.run_id}: adapter.method {method} cannot be merged into the base weights (its virtual "
            "tokens are extra inputs, not a weight delta); serve the adapter itself with the CPU engine (PEFT), "
            "or train with lora, dora or ia3 to get a mergeable adapter"
        )
    model_cfg = run.job.model
    base_config = AutoConfig.from_pretrained(
        resolve_model(model_cfg.name_or_path),
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if getattr(base_config, "quantization_config", None):
        raise MergeError(
            f"{model_cfg.name_or_path} is a pre-quantized checkpoint: merging needs full-precision base weights; "
            "point model.name_or_path at the unquantized model"
        )


def merge_checked(run: FinishedRun, dtype: str, probe):
    """The merged model, and how far its logits are from base + adapter (and base + adapter from the base)."""
    import torch
    from peft import PeftModel

    from lorafleet.model_loading import load_base_model_weights

    model_cfg = run.job.model
    base = load_base_model_weights(  # no quantization_config: full-precision (dequantized) weights
        model_cfg.name_or_path,
        revision=model_cfg.revision,
        dtype=getattr(torch, MERGE_DTYPES[dtype]),
        trust_remote_code=model_cfg.trust_remote_code,
    )
    base.eval()
    with torch.no_grad():
        base_logits = base(probe).logits.float()
        model = PeftModel.from_pretrained(base, str(run.adapter_dir))
        model.eval()
        expected = model(probe).logits.float()
        merged = model.merge_and_unload(safe_merge=True)
        got = merged(probe).logits.float()
    diff = (got - expected).abs().max().item()
    if dtype == "fp32" and not diff <= FP32_TOLERANCE * max(1.0, expected.abs().max().item()):
        raise LorafleetError(f"merge check failed: merged logits differ from base + adapter by {diff:.3g} (fp32)")
    return merged, {"max_abs_logit_diff": diff, "adapter_effect": (expected - base_logits).abs().max().item()}


def method_name(adapter_config: dict) -> str:
    peft_type = str(adapter_config.get("peft_type") or "unknown").lower()
    return "dora" if peft_type == "lora" and adapter_config.get("use_dora") else peft_type


def model_card(run: FinishedRun, adapter_config: dict, summary: MergeSummary) -> str:
    """README.md of a merged model: where it came from, how it was made, and how well it does."""
    job = run.job
    base = job.model.name_or_path
    details = [
        f"- **Base model**: `{base}`" + (f" (revision `{job.model.revision}`)" if job.model.revision else ""),
        f"- **Method**: {summary.method}"
        + _method_details(adapter_config)
        + ", merged with PEFT `merge_and_unload`"
        + (
            f"; trained as QLoRA ({job.model.quantization}), merged into the unquantized base"
            if job.model.quantization != "none"
            else ""
        ),
        f"- **Run**: `{run.run_id}` (config sha256 `{job.config_hash()[:16]}`)",
        f"- **Data**: `{job.data.train}`"
        + (f", eval `{job.data.eval}`" if job.data.eval else "")
        + f" ({job.data.format}); data hash `{data_hash(run) or 'n/a'}`",
        f"- **Weights**: {summary.dtype}, {summary.shards} safetensors shard(s)",
        f"- **Merge check**: max |logit diff| vs base + adapter on a probe prompt: {summary.max_abs_logit_diff:.3g} "
        f"(the adapter itself moves logits by up to {summary.adapter_effect:.3g})",
    ]
    front_matter = {"base_model": base, "library_name": "transformers", "tags": ["lorafleet", summary.method, "merged"]}
    lines = [
        "---",
        yaml.safe_dump(front_matter, sort_keys=False).strip(),
        "---",
        "",
        f"# {job.name} (merged)",
        "",
        f"The `{run.run_id}` adapter merged into its base model.",
        "",
        *details,
        "",
        "## Metrics",
        "",
        *_metrics_table(run),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _method_details(adapter_config: dict) -> str:
    if adapter_config.get("r"):
        alpha = adapter_config.get("lora_alpha")
        return f" (r={adapter_config['r']}, alpha={alpha}, targets {_targets(adapter_config)})"
    return f" (targets {_targets(adapter_config)})" if adapter_config.get("target_modules") else ""


def _targets(adapter_config: dict) -> str:
    targets = adapter_config.get("target_modules")
    return ", ".join(sorted(targets)) if isinstance(targets, list | tuple) else str(targets)


def _metrics_table(run: FinishedRun) -> list[str]:
    report = run.eval_report()
    if report is None:
        return [f"No evaluation yet: `lorafleet eval {run.run_id}` writes report/eval.json, then merge again."]
    base, tuned = report.get("base") or {}, report.get("finetuned") or {}
    rows = [
        f"From `report/eval.json`: {report.get('n')} examples of `{(report.get('data') or {}).get('source')}`, "
        f"task {report.get('task')}.",
        "",
        "| metric | base | fine-tuned |",
        "| --- | ---: | ---: |",
    ]
    for key in tuned:
        rows.append(f"| {key} | {_number(base.get(key))} | {_number(tuned.get(key))} |")
    return rows


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)
