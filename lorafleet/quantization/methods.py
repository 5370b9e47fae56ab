"""The quantization methods `lorafleet quantize --method` takes, and how each is stored.

| method      | weights                          | activations            | calibration | vLLM kernel (GPU)   |
| ----------- | -------------------------------- | ---------------------- | ----------- | ------------------- |
| int8        | int8, one scale per output row   | full precision         | no          | W8A16 (Marlin)      |
| int4        | int4, one scale per 128 inputs   | full precision         | no          | W4A16 (Marlin)      |
| gptq-w4a16  | int4 like int4, chosen by GPTQ   | full precision         | yes         | W4A16 (Marlin)      |
| w8a8        | int8, one scale per output row   | int8, per token, dynamic | no        | W8A8 int8 (CUTLASS) |

All are symmetric (no zero point) and written in the compressed-tensors format (`pack-quantized` for weight-only,
`int-quantized` for w8a8), the format llm-compressor writes and vLLM reads without extra flags.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lorafleet.errors import LorafleetError

GROUP_SIZE = 128


class QuantizationError(LorafleetError):
    """A model or method that cannot be quantized as asked."""

    exit_code = 2


@dataclass(frozen=True)
class QuantMethod:
    name: str
    bits: int
    group_size: int | None  # None: one scale per output channel
    activations_int8: bool = False
    needs_calibration: bool = False
    description: str = ""

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def format(self) -> str:
        return "int-quantized" if self.activations_int8 else "pack-quantized"

    def group_for(self, in_features: Iterable[int]) -> int | None:
        """One group size for layers with these input sizes (a compressed-tensors config holds one): the method's,
        else the largest of 64, 32, 16, 8 dividing them all; None: one scale per output channel."""
        if self.group_size is None:
            return None
        sizes = set(in_features)
        for size in (self.group_size, 64, 32, 16, 8):
            if all(features % size == 0 for features in sizes):
                return size
        raise QuantizationError(f"layers with {sorted(sizes)} inputs cannot share 4-bit groups of 8 or more")


METHODS: dict[str, QuantMethod] = {
    method.name: method
    for method in (
        QuantMethod("int8", 8, None, description="weight-only int8, per output channel, round to nearest"),
        QuantMethod("int4", 4, GROUP_SIZE, description="weight-only int4, groups of 128, round to nearest"),
        QuantMethod(
            "gptq-w4a16",
            4,
            GROUP_SIZE,
            needs_calibration=True,
            description="weight-only int4, groups of 128, GPTQ (error compensation from calibration data)",
        ),
        QuantMethod("w8a8", 8, None, activations_int8=True, description="int8 weights and dynamic int8 activations"),
    )
}


def get_method(name: str) -> QuantMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise QuantizationError(
            f"--method {name}: unknown quantization method; use one of {', '.join(METHODS)}"
        ) from None
