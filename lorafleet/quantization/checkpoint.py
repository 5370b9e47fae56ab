"""Quantized model folders in the compressed-tensors format: written here, read by vLLM, transformers and us.

    save_quantized(model, weights, method, out_dir, dtype="bf16")    # weights: {module name: QuantizedWeight}
    folder_method(out_dir)                                           # "int8", ... (None: not quantized)

The folder is an HF model folder whose config.json carries `quantization_config` with
`quant_method: compressed-tensors` (what llm-compressor writes): one config group targeting `Linear`, `lm_head`
ignored (kept in the folder's dtype, as llm-compressor's schemes do). Weight-only methods are `pack-quantized`
(int4 / int8 values packed into int32 `weight_packed`, `weight_scale`, `weight_shape`); w8a8 is `int-quantized`
(int8 `weight` + `weight_scale`) with dynamic per-token int8 input activations. The library `compressed-tensors`
(the vLLM project's) does the packing, so the layout is the one vLLM and transformers unpack.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafleet.quantization.methods import METHODS, QuantizationError, QuantMethod
from lorafleet.quantization.weights import QuantizedWeight

IGNORED = ["lm_head"]
RECORD = "lorafleet-quantization.json"  # what `lorafleet quantize` made it from and how; publish copies it
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantization_config(method: QuantMethod, group_size: int | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=method.bits,
        type="int",
        symmetric=True,
        strategy="group" if group_size else "channel",
        group_size=group_size,
    )
    activations = (
        QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        if method.activations_int8
        else None
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=IGNORED, format=method.format)


def save_quantized(
    model: torch.nn.Module,
    weights: dict[str, QuantizedWeight],
    method: QuantMethod,
    group: int | None,
    out_dir: Path,
    dtype: str,
) -> None:
    """Write `model` with `weights` (in groups of `group` inputs) for its Linear layers into the empty `out_dir`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    model.to(DTYPES[dtype])
    apply_quantization_config(model, quantization_config(method, group))
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "weight_scale"):
                continue
            if name not in weights:
                raise QuantizationError(f"layer {name} has no quantized weights")
            quantized = weights[name]
            # compressed-tensors rounds weight / scale again: give it the grid values in float32, where they are exact
            module.weight.data = quantized.dequantize()
            module.weight_scale.data = quantized.scales.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=method.format)
    compressor.compress_model(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    compressor.update_config(str(out_dir))


def folder_quantization(folder: str | Path) -> dict | None:
    """The `quantization_config` of a model folder's config.json (None when it has none)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("quantization_config")


def folder_method(folder: str | Path) -> str | None:
    """Which of our methods a compressed-tensors folder holds (None: not quantized); other formats are errors."""
    config = folder_quantization(folder)
    if config is None:
        return None
    if config.get("quant_method") != "compressed-tensors":
        raise QuantizationError(
            f"{folder}: quant_method {config.get('quant_method')!r} is not served by the CPU engine; it loads "
            "compressed-tensors folders (`lorafleet quantize`, llm-compressor)"
        )
    groups = list((config.get("config_groups") or {}).values())
    if len(groups) != 1 or not groups[0].get("weights"):
        raise QuantizationError(f"{folder}: expected one compressed-tensors config group with weight quantization")
    weights, activations = groups[0]["weights"], groups[0].get("input_activations")
    bits = weights.get("num_bits")
    if activations:
        return "w8a8" if bits == 8 else _unsupported(folder, weights)
    recorded = _recorded_method(folder)
    if recorded in METHODS and METHODS[recorded].bits == bits:
        return recorded
    return {8: "int8", 4: "int4"}.get(bits) or _unsupported(folder, weights)


def quantization_record(folder: str | Path | None) -> dict:
    """The folder's `lorafleet-quantization.json` ({} when it has none or is not a folder)."""
    record = Path(folder) / RECORD if folder else None
    if record is None or not record.is_file():
        return {}
    try:
        loaded = json.loads(record.read_text())
    except json.JSONDecodeError as exc:
        raise QuantizationError(f"{record}: not valid JSON ({exc})") from None
    return loaded if isinstance(loaded, dict) else {}


def quantized_from(folder: str | Path | None) -> str | None:
    """The base a quantized folder was made from (adapters of that base apply to it), None if unknown."""
    return quantization_record(folder).get("base_model")


def _recorded_method(folder: str | Path) -> str | None:
    return quantization_record(folder).get("method")


def _unsupported(folder, weights) -> str:
    raise QuantizationError(f"{folder}: weights of {weights.get('num_bits')} bits are not one of our methods")
