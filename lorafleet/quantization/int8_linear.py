"""The CPU engine's quantized matmul: int8 weights in fbgemm's packed layout, activations quantized on the fly.

    quantize_linears(model, get_method("int8"))      # every nn.Linear of the base model, in place

Why this kernel (measured on this 2-core AVX2 machine, 16 rows, ms per call; docs/quantization.md has the
table): fbgemm's dynamic int8 linear (`torch.ops.quantized.linear_dynamic`) 0.48 on a 576 x 1536 projection
and 13 on SmolLM2's LM head, against 0.53 and 18 for float32 in oneDNN's packed layout; torchao's int8
weight-only linear 1.25, and the int4 kernels of torch and torchao 35x slower than float32. So every method
runs on this kernel here: int8 and w8a8 weights as they are (exactly); int4 / GPTQ weights are rounded once
more, per output channel, to int8 (that rounding error is at most 1/16 of the int4 step; the 4-bit files are
what vLLM serves). fbgemm quantizes each call's activations to 8 bits (per tensor, 7-bit range on AVX2), which
is w8a8's arithmetic; the perplexity cost is measured, not assumed (tests, `lorafleet eval --compare`).

A layer stays a `torch.nn.Linear` (its class is switched to `Int8Linear`), so PEFT wraps it like any other
Linear and LoRA adapters run in full precision on top. Its float `weight` is gone; reading `.weight` gives the
dequantized matrix (PEFT's DoRA norms, shape checks) computed on demand.
"""

from __future__ import annotations

import warnings

import torch

from lorafleet.quantization.methods import QuantMethod
from lorafleet.quantization.weights import QuantizedWeight, round_to_nearest

INT8 = QuantMethod("int8", 8, None)


class Int8Linear(torch.nn.Linear):
    """A Linear whose weight is int8 (per output channel) in fbgemm's packed form; forward in int8."""

    _packed: torch.Tensor  # fbgemm's LinearPackedParams (script object)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
        out = torch.ops.quantized.linear_dynamic(flat, self._packed, True)  # True: reduce_range, needed on AVX2
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features + 8 * self.out_features  # int8 values, fp32 scale + zero


def pack_int8(quantized: QuantizedWeight) -> torch.Tensor:
    """fbgemm's packed params for per-channel int8 weights (`quantized` has one scale per row)."""
    if quantized.scales.shape[1] != 1:
        quantized = requantize_per_channel(quantized)
    scales = quantized.scales[:, 0].double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's notice that quantized tensors are deprecated
        qweight = torch._make_per_channel_quantized_tensor(
            quantized.ints, scales, torch.zeros_like(scales, dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(qweight, None)


def requantize_per_channel(quantized: QuantizedWeight) -> QuantizedWeight:
    """Group-scaled (int4) weights as int8 with one scale per output row (see the module docstring)."""
    return round_to_nearest(quantized.dequantize(), INT8)


def to_int8_linear(module: torch.nn.Linear, quantized: QuantizedWeight) -> Int8Linear:
    """Switch `module` to `Int8Linear` in place, holding `quantized` instead of its float weight."""
    packed = pack_int8(quantized)
    del module._parameters["weight"]
    module.__class__ = Int8Linear
    module._packed = packed
    return module


def int8_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def quantized_linears(model: torch.nn.Module) -> list[Int8Linear]:
    return [module for module in model.modules() if isinstance(module, Int8Linear)]


def quantize_linears(model: torch.nn.Module, method: QuantMethod) -> int:
    """Every `torch.nn.Linear` of `model` rounded by `method` (the LM head: by int8) and run by `Int8Linear`.

    The LM head gets int8 whatever the method (4 bits there costs far more quality than anywhere else, and
    quantized folders keep it unquantized). Weights already on an int8 per-channel grid (an int8 folder loaded
    dense) come back to the same integers. Returns how many layers were switched.
    """
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        chosen = INT8 if name.split(".")[-1] == "lm_head" else method
        to_int8_linear(module, round_to_nearest(module.weight.data, chosen))
        count += 1
    return count
