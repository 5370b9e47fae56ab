"""The CPU engine's quantized matmul: int8 weights per output channel, activations quantized per token on the fly.

    quantize_linears(model, get_method("int8"))      # every nn.Linear of the base model, in place

Each call rounds every row (token) of its input to int8 with that row's own scale (absmax / 127), multiplies
int8 by int8 into int32 (`torch._int_mm`, oneDNN's u8s8 kernels) and scales the result by row scale x channel
scale: W8A8 with dynamic per-token activations, the arithmetic of vLLM's w8a8 int8 scheme. Measured here
(16 rows, 2 threads, µs per call; docs/quantization.md has the table): 576 x 1536 projection 50 against 187
for float32 packed by oneDNN and 99 for bf16; the 49152-wide LM head 2400 against 5700 and 2800.

Why not fbgemm's dynamic linear (`quantized.linear_dynamic`, as fast): it quantizes activations per tensor with
a 7-bit range, and SmolLM2's activations have outlier channels: int8 perplexity went 18.4 -> 62.6 (3.4x). Per
token it stays within 1%. Every method runs on this kernel: int8 and w8a8 weights as they are (exactly); int4 /
GPTQ weights are rounded once more, per output channel, to int8 (at most 1/16 of the int4 step; the 4-bit
files are what vLLM serves).

A layer stays a `torch.nn.Linear` (its class is switched to `Int8Linear`), so PEFT wraps it like any other
Linear and LoRA adapters run in full precision on top. Its float `weight` is gone; reading `.weight` gives the
dequantized matrix (PEFT's DoRA norms, shape checks) computed on demand.
"""

from __future__ import annotations

import torch

from lorafleet.quantization.methods import QuantMethod
from lorafleet.quantization.weights import QuantizedWeight, round_to_nearest

INT8 = QuantMethod("int8", 8, None)


class Int8Linear(torch.nn.Linear):
    """A Linear whose weight is int8 with one scale per output channel; forward in int8 with per-token scales."""

    _ints_t: torch.Tensor  # int8 [in, out]: the transposed view `_int_mm` takes as its right operand
    _scales: torch.Tensor  # float32 [out]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._ints_t.t().float() * self._scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
        row_scales = (flat.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
        ints = (flat / row_scales).round_().to(torch.int8)
        out = torch._int_mm(ints, self._ints_t).to(torch.float32).mul_(row_scales).mul_(self._scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    def weight_bytes(self) -> int:
        return self._ints_t.numel() + 4 * self._scales.numel()


def to_int8_linear(module: torch.nn.Linear, quantized: QuantizedWeight) -> Int8Linear:
    """Switch `module` to `Int8Linear` in place, holding `quantized` (rounded per output row first if it has
    several scales a row) instead of its float weight."""
    if quantized.scales.shape[1] != 1:
        quantized = round_to_nearest(quantized.dequantize(), INT8)
    del module._parameters["weight"]
    module.__class__ = Int8Linear
    module._ints_t = quantized.ints.t()
    module._scales = quantized.scales[:, 0].contiguous()
    return module


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
