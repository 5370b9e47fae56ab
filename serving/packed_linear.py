"""The base model's linear layers in oneDNN's blocked weight layout: the CPU engine's matmuls at decode sizes.

A decode step multiplies a few rows (the batch) by every weight of the model. `F.linear` hands that to MKL's
GEMM, which on skinny shapes reaches ~60% of what oneDNN gets from a weight reordered once into its blocked
layout. Measured here, one thread, 16 rows: a 576 x 1536 projection 490 us → 322 us, SmolLM2's LM head
(49,152 x 576) 33 ms → 12 ms; the same holds for prefill sizes (512 rows: 10.6 ms → 8.9 ms).

`pack_linears(model)` gives every `torch.nn.Linear` of the base model a packed copy of its weight (kept beside
it: PEFT reads the dense weight for DoRA's norms, and `modules_to_save` copies the module) and switches its
class to `PackedLinear`, whose forward uses the packed copy only while it is the copy of the current weight:
an in-place change (`weight._version`), a new weight or a deep copy of the module (which is not in the table)
falls back to `F.linear`, so a stale copy is never read. The cost: a second copy of the linear weights in memory.
bfloat16 weights are packed as well where oneDNN has bf16 (about 1.8x the float32 packed rate where it is native).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class _Packed:
    weight: torch.Tensor  # oneDNN's opaque blocked tensor
    source: int  # data_ptr of the dense weight it was made from
    version: int  # that weight's version counter then


_PACKED: weakref.WeakKeyDictionary[torch.nn.Module, _Packed] = weakref.WeakKeyDictionary()


class PackedLinear(torch.nn.Linear):
    """A `torch.nn.Linear` whose forward multiplies by its packed weight when that copy is current."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = _PACKED.get(self)
        if packed is None or not _current(packed, self.weight):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # oneDNN's packed linear has no backward
        return linear(x, self.weight, packed.weight, self.bias)


def _current(packed: _Packed, weight: torch.Tensor) -> bool:
    return weight.data_ptr() == packed.source and weight._version == packed.version


def packed_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the packed copies of `model`'s linear weights (beside the dense weights themselves)."""
    return sum(
        module.weight.numel() * module.weight.element_size() for module in model.modules() if module in _PACKED
    )


def can_pack(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Packing pays where oneDNN runs the matmul: float32 weights on the CPU, or bfloat16 where oneDNN has it
    (one thread, 16 rows, 576 x 1536: bf16 252 us → 186 us packed, vs fp32 482 → 328 us)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` ([out, in], as a Linear holds it) in oneDNN's layout, or None where packing does not pay."""
    if not can_pack(weight.dtype, weight.device):
        return None
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, by the packed copy of `weight` when there is one and `x` suits it."""
    if packed is None or x.dtype != weight.dtype or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> int:
    """Pack every plain `torch.nn.Linear` of `model` (float32 or bfloat16, CPU); returns how many were packed."""
    count = 0
    for module in model.modules():
        if type(module) not in (torch.nn.Linear, PackedLinear):
            continue
        packed = packed_weight(module.weight)
        if packed is None:
            continue
        _PACKED[module] = _Packed(packed, module.weight.data_ptr(), module.weight._version)
        module.__class__ = PackedLinear
        count += 1
    return count
