"""`lorafleet quantize MODEL --method int8|int4|gptq-w4a16|w8a8 --out DIR`: a quantized model folder.

    lorafleet quantize price-20250101-120000 --method gptq-w4a16 --out /models/price-w4a16   # a run: merged first
    lorafleet quantize registry:price-merged@v2 --method int8 --out /models/price-int8
    lorafleet quantize builtin:smollm2-135m-instruct --method int4 --out base-int4
    lorafleet publish /models/price-w4a16 --name price-w4a16 --merged

One linear story: resolve MODEL (model_sources.py) → calibration rows if the method needs them (GPTQ) →
the model in float32 → integers and scales per Linear layer (lorafleet.quantization) → perplexity of the
source and of the quantized weights on held-out rows when a run is known → the compressed-tensors folder,
written under a temporary name and renamed into place, with `lorafleet-quantization.json` (method, source,
calibration sha256, eval numbers) that `publish --merged` copies into the manifest.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.quantization.checkpoint import RECORD, folder_quantization
from lorafleet.quantization.methods import QuantizationError, get_method
from lorafleet.storage import staged_folder
from lorafleet.training.model_sources import ModelSource, calibration_data, resolve_source

EVAL_EXAMPLES = 32


@dataclass(frozen=True)
class QuantizeSettings:
    method: str
    out: Path
    calibration: str | None = None
    calibration_format: str | None = None
    calibration_samples: int = 128
    calibration_max_len: int = 512
    dtype: str = "bf16"
    storage: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class QuantizeSummary:
    out_dir: Path
    record: dict[str, Any]
    size_bytes: int
    seconds: float


def quantize_model(reference: str, settings: QuantizeSettings) -> QuantizeSummary:
    from lorafleet.model_loading import load_base_tokenizer
    from lorafleet.quantization.apply import collect_hessians, quantize_weights, shared_group

    started = time.monotonic()
    method = get_method(settings.method)
    if settings.dtype not in ("bf16", "fp16", "fp32"):
        raise QuantizationError(f"--dtype {settings.dtype}: use bf16, fp16 or fp32")
    out_dir = Path(settings.out).expanduser().resolve()
    if out_dir.exists() and not settings.overwrite:
        raise QuantizationError(f"{out_dir} already exists: pass --overwrite to replace it, or choose another --out")
    source = resolve_source(reference, settings.storage)
    if folder_quantization(source.folder) and not source.merge_run:
        raise QuantizationError(f"{reference} is already quantized: quantize its full-precision model instead")
    tokenizer = load_base_tokenizer(source.folder)
    calibration = None
    if method.needs_calibration or settings.calibration:
        calibration = calibration_data(
            settings.calibration,
            source,
            tokenizer,
            samples=settings.calibration_samples,
            max_len=settings.calibration_max_len,
            fmt=settings.calibration_format,
        )
    if method.needs_calibration and (calibration is None or not calibration.sequences):
        raise QuantizationError(
            f"--method {method.name} needs calibration data and {reference} names no run to take it from: "
            "pass --calibration FILE (JSONL rows) or --calibration RUN"
        )
    model = source.load()
    hessians = None
    if method.needs_calibration:
        batches = [_ids(sequence) for sequence in calibration.sequences]
        hessians = collect_hessians(model, batches, total=len(batches))
    examples = _eval_examples(source, tokenizer)
    before = perplexity(model, examples) if examples else None
    group = shared_group(model, method)
    weights = quantize_weights(model, method, group, hessians)
    _apply_dequantized(model, weights)
    after = perplexity(model, examples) if examples else None
    record = {
        "method": method.name,
        "description": method.description,
        "format": f"compressed-tensors ({method.format})",
        "source": reference,
        **source.facts,
        "dtype": settings.dtype,
        "layers": len(weights),
        "calibration": calibration.facts() if calibration is not None else None,
        "eval": _eval_facts(before, after, len(examples)),
    }
    size = _write_folder(model, weights, group, method, tokenizer, record, out_dir, settings)
    return QuantizeSummary(out_dir, record, size, round(time.monotonic() - started, 1))


def _ids(sequence: list[int]):
    import torch

    return torch.tensor([sequence], dtype=torch.long)


def _apply_dequantized(model, weights) -> None:
    """The model's Linear weights replaced by what the quantized folder stores (for the eval numbers)."""
    modules = dict(model.named_modules())
    for name, quantized in weights.items():
        modules[name].weight.data = quantized.dequantize().to(modules[name].weight.dtype)


def _eval_examples(source: ModelSource, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Up to 32 held-out (input_ids, labels) of the source's run, rendered as in evaluation; none without a run."""
    if source.run is None:
        return []
    from lorafleet.training.evaluate_data import load_eval_data

    job = source.run.job
    settings = job.eval.model_copy(update={"max_examples": EVAL_EXAMPLES})
    return [(e.input_ids, e.labels) for e in load_eval_data(job, settings, tokenizer).examples]


def perplexity(model, examples: list[tuple[list[int], list[int]]]) -> float:
    """exp(mean loss over label tokens), one example at a time (no padding)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for input_ids, labels in examples:
            logits = model(input_ids=torch.tensor([input_ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            keep = target != -100
            if keep.any():
                loss = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
                total, count = total + loss.item(), count + int(keep.sum())
    return math.exp(total / count) if count else float("nan")


def _eval_facts(before: float | None, after: float | None, n: int) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    return {
        "examples": n,
        "perplexity_source": round(before, 4),
        "perplexity": round(after, 4),
        "perplexity_ratio": round(after / before, 4),
        "note": "weights as stored (weight-only arithmetic); held-out rows of the run",
    }


def _write_folder(model, weights, group, method, tokenizer, record, out_dir: Path, settings: QuantizeSettings) -> int:
    from lorafleet.quantization.checkpoint import save_quantized

    with staged_folder(out_dir) as staging:
        save_quantized(model, weights, method, group, staging, settings.dtype)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        size = sum(path.stat().st_size for path in staging.glob("*.safetensors"))
        record["size_bytes"] = size
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_dir}", file=sys.stderr, flush=True)
    return size
