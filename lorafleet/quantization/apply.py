"""Quantize a model's Linear layers by a method: calibration statistics, then integers and scales per layer.

hessians = collect_hessians(model, batches)          # only for methods that need calibration (GPTQ)
group = shared_group(model, method)
weights = quantize_weights(model, method, group, hessians)  # {module name: QuantizedWeight}, LM head left out
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from tqdm import tqdm

from lorafleet.quantization.checkpoint import IGNORED
from lorafleet.quantization.methods import QuantizationError, QuantMethod
from lorafleet.quantization.weights import QuantizedWeight, gptq, round_to_nearest


def target_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers a quantized folder stores as integers: all but the LM head."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in IGNORED
    ]


def collect_hessians(model: torch.nn.Module, batches: Iterable[torch.Tensor], total: int) -> dict[str, torch.Tensor]:
    """Sum of X^T X of every target layer's inputs over the calibration batches (token ids [rows, len])."""
    hessians: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hessians[name] = hessians.get(name, 0) + 2 * x.t() @ x

        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in target_linears(model)]
    try:
        with torch.no_grad():
            for ids in tqdm(batches, total=total, desc="calibrate", unit="batch", file=sys.stderr):
                model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def shared_group(model: torch.nn.Module, method: QuantMethod) -> int | None:
    """The one group size all target layers use (a compressed-tensors config holds one); None: per channel."""
    return method.group_for(module.in_features for _, module in target_linears(model))


def quantize_weights(
    model: torch.nn.Module, method: QuantMethod, group: int | None, hessians: dict[str, torch.Tensor] | None = None
) -> dict[str, QuantizedWeight]:
    """Every target layer's integers and scales, in groups of `group` inputs (None: one scale per row)."""
    if method.needs_calibration and not hessians:
        raise QuantizationError(f"--method {method.name} needs calibration data: pass --calibration FILE|RUN")
    weights: dict[str, QuantizedWeight] = {}
    for name, module in tqdm(target_linears(model), desc=f"quantize {method.name}", unit="layer", file=sys.stderr):
        if method.needs_calibration:
            weights[name] = gptq(module.weight.data, hessians[name], method, group)
        else:
            weights[name] = round_to_nearest(module.weight.data, method, group)
    return weights
