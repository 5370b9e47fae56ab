"""One weight matrix to integers and scales: round to nearest, or GPTQ.

A `QuantizedWeight` holds `ints` [out, in] (int8, within ±qmax) and `scales` [out, groups] (float32); the
weight it stands for is `ints * scales` with each scale repeated over its group of inputs. Scales are symmetric
(absmax / qmax per row or per group), so there is no zero point.

GPTQ (Frantar et al., 2022) quantizes the columns of W one at a time and spreads each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the layer's calibration
inputs X, so that ||W X - Q X|| stays small rather than ||W - Q||. Blocks of 128 columns make the updates
matmuls; a group's scale is fixed from the (error-updated) weights when its first column comes up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.quantization.methods import QuantMethod

GPTQ_BLOCK = 128
DAMPING = 0.01  # share of the mean Hessian diagonal added to it (GPTQ's percdamp)


@dataclass(frozen=True)
class QuantizedWeight:
    ints: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # float32 [out, groups]

    @property
    def group_size(self) -> int:
        return self.ints.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        return self.ints.float() * self.scales.repeat_interleave(self.group_size, dim=1)


def _scales(weight: torch.Tensor, qmax: int, group: int) -> torch.Tensor:
    """absmax / qmax per row and group, rounded to bfloat16's grid: then the scale a folder stores (bf16, fp16 or
    fp32) is exactly the one the integers were chosen with."""
    grouped = weight.reshape(weight.shape[0], -1, group)
    scales = (grouped.abs().amax(-1) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    return scales.to(torch.bfloat16).float()


def _round(weight: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
    group = weight.shape[1] // scales.shape[1]
    return (weight / scales.repeat_interleave(group, dim=1)).round().clamp(-qmax, qmax)


def round_to_nearest(weight: torch.Tensor, method: QuantMethod, group: int | None = None) -> QuantizedWeight:
    """`weight` [out, in] on `method`'s grid, in groups of `group` inputs (default: the method's for this layer)."""
    weight = weight.detach().float()
    group = group or method.group_for([weight.shape[1]]) or weight.shape[1]
    scales = _scales(weight, method.qmax, group)
    return QuantizedWeight(_round(weight, scales, method.qmax).to(torch.int8), scales)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, method: QuantMethod, group: int | None) -> QuantizedWeight:
    """GPTQ of `weight` [out, in] given the summed X^T X [in, in] of its inputs."""
    w = weight.detach().float().clone()
    columns = w.shape[1]
    group = group or columns
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMPING * torch.diag(h).mean() * torch.eye(columns, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    ints = torch.zeros_like(w, dtype=torch.int8)
    scales = torch.zeros(w.shape[0], columns // group)
    for start in range(0, columns, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        for offset in range(end - start):
            column = start + offset
            if column % group == 0:
                ahead = torch.cat([block[:, offset:], w[:, end:]], dim=1)[:, :group]
                scales[:, column // group] = _scales(ahead, method.qmax, group)[:, 0]
            scale = scales[:, column // group]
            q = (block[:, offset] / scale).round().clamp(-method.qmax, method.qmax)
            ints[:, column] = q.to(torch.int8)
            error = (block[:, offset] - q * scale) / h_block[offset, offset]
            block[:, offset:] -= error[:, None] * h_block[offset, offset:][None, :]
            errors[:, offset] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return QuantizedWeight(ints, scales)
