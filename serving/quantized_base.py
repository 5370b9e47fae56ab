"""The CPU engine's quantized base: `--quantization int8|int4`, or a quantized folder served as it says.

    serve --base builtin:smollm2-135m-instruct --quantization int8     # rounded at load
    serve --base /models/price-w4a16                                   # a `lorafleet quantize` folder

transformers loads a compressed-tensors folder dense (the stored integers times their scales); every Linear
layer then runs on `lorafleet.quantization.int8_linear` (int8 x int8, per-token scales), the LM head
included. A folder's values are re-rounded per output channel to int8: exactly the stored ones for 8-bit
folders, within 1/16 of a 4-bit step for 4-bit ones. Adapters are loaded afterwards by PEFT on top of these
layers, in full precision.
"""

from __future__ import annotations

import logging
from typing import Any

from lorafleet.quantization.checkpoint import folder_method
from lorafleet.quantization.int8_linear import INT8, quantize_linears, quantized_linears
from lorafleet.quantization.methods import QuantizationError, get_method
from lorafleet.serving.packed_linear import packed_bytes

log = logging.getLogger("lorafleet.serving")


def quantization_of(folder: str, asked: str | None) -> str | None:
    """The method the base is served with: the flag's, else the folder's; None for a float base."""
    stored = folder_method(folder)
    if stored is None:
        return None if asked in (None, "none") else asked
    if asked is None:
        return stored
    if asked == "none" or get_method(asked).bits != get_method(stored).bits:
        raise QuantizationError(
            f"--quantization {asked}: {folder} holds {stored} weights; leave the flag out to serve them as they are"
        )
    return stored


def quantize_base(model: Any, folder: str, asked: str | None) -> str | None:
    """Switch `model`'s Linear layers to int8 kernels as `quantization_of` says; returns the method (or None)."""
    method = quantization_of(folder, asked)
    if method is None:
        return None
    rounding = INT8 if folder_method(folder) is not None else get_method(method)
    layers = quantize_linears(model, rounding)
    log.info("base quantized: %s (%d Linear layers on int8 kernels)", method, layers)
    return method


def weight_bytes(model: Any) -> int:
    """Bytes the model's weights hold as the engine serves it: parameters and buffers (each storage once), the
    int8 layers' integers and scales, and the packed copies of float linear weights."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    quantized = sum(layer.weight_bytes() for layer in quantized_linears(model))
    return sum(seen.values()) + quantized + packed_bytes(model)
