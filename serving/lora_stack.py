"""Mixed-adapter LoRA in one pass per layer: the adapters of a batch stacked along the rank dimension.

PEFT's mixed-batch forward (`adapter_names`) loops, in every LoRA layer, over the adapters in the batch: select
their rows, run that adapter's A and B, add the result back; 4 adapters cost 4 small passes per layer. Here the
batch's adapters are concatenated once per layer, and every row is masked to its own columns:

    A_cat = [A_1^T | A_2^T | ...]               [in, r_1 + r_2 + ...]
    B_cat = [s_1 B_1^T ; s_2 B_2^T ; ...]       [r_1 + r_2 + ..., out]    (s_i: PEFT's scaling, folded in)
    out   = base(x) + where(row owns column, x @ A_cat, 0) @ B_cat

so one step costs two matmuls per layer whatever the number of adapters. Ranks may differ (columns are
concatenated, nothing is padded); an adapter that does not target a layer has no columns there; base and
prompt-learning rows own no column and get no delta. Masking with `where` rather than a multiply keeps a NaN or
inf in one adapter's activations out of the other rows; an adapter whose weights are not finite is never stacked
(0 x NaN is NaN in the second matmul), its layers keep PEFT's forward, which selects rows per adapter.

The rule: a PEFT `lora.Linear` layer is stacked when every stacked adapter that targets it is plain LoRA there
(no DoRA or other `lora_variant`, no `lora_bias`, finite weights times scaling). Every other LoRA layer
(embeddings, conv, a layer with a DoRA adapter, ...) and PEFT's auxiliary wrappers (`modules_to_save`, trainable
tokens) keep PEFT's own forward with `adapter_names`. Dropout is skipped: serving runs in eval mode.

Measured per layer on CPU, one thread, 32 rows x 1 token, 4 adapters r=16, hidden 64: concatenation + masked
fill 50 us, a per-row gathered `bmm` (rank padded to the max) 185 us, so concatenation it is (also ahead at
hidden 576). A stack holds a copy of its adapters' LoRA weights; `AdapterStore` drops it at every load and
delete, so a stack never outlives the weights it copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lorafleet.serving.packed_linear import linear, packed_weight


class StackedLayer:
    """The forward of one PEFT `lora.Linear` during a stacked pass (set as the module's `forward`)."""

    def __init__(self, module: torch.nn.Module, a: torch.Tensor | None, b: torch.Tensor | None, layout: int):
        self.module, self.a, self.b, self.layout = module, a, b, layout
        # As Linear weights ([out, in]), in oneDNN's layout where that pays (float32 on the CPU), else None
        self.a_packed = packed_weight(a.t()) if a is not None else None
        self.b_packed = packed_weight(b.t()) if b is not None else None
        self.drop: torch.Tensor | None = None  # this pass: [rows, 1, columns], True where the row does not own it

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.module.base_layer(x, *args, **kwargs)
        if self.a is None:  # no adapter of the stack targets this layer
            return result
        hidden = linear(x.to(self.a.dtype), self.a.t(), self.a_packed)
        hidden.masked_fill_(self.drop if x.dim() == 3 else self.drop[:, 0], 0.0)
        return result.add_(linear(hidden, self.b.t(), self.b_packed).to(result.dtype))


class LoraStack:
    """The stacked weights of a set of adapters (PEFT internal names), for every LoRA layer of the model."""

    def __init__(self, names: list[str], hooked: list[torch.nn.Module]):
        from peft.tuners.lora.layer import Linear

        self.names = names
        self._slot = {name: slot for slot, name in enumerate(names)}
        self.layers: list[StackedLayer] = []
        self.fallback: list[torch.nn.Module] = []  # modules that keep PEFT's forward (`adapter_names`)
        layouts: dict[tuple[tuple[str, int], ...], int] = {}
        for module in hooked:
            present = [name for name in names if type(module) is Linear and name in module.lora_A]
            if type(module) is not Linear or module.merged or not all(_plain(module, name) for name in present):
                self.fallback.append(module)
                continue
            if not present:
                self.layers.append(StackedLayer(module, None, None, -1))
                continue
            key = tuple((name, module.r[name]) for name in present)
            a = torch.cat([module.lora_A[name].weight.t() for name in present], dim=1).contiguous()
            b = torch.cat([module.lora_B[name].weight.t() * module.scaling[name] for name in present]).contiguous()
            self.layers.append(StackedLayer(module, a, b, layouts.setdefault(key, len(layouts))))
        # Per layout, the slot (index in `names`) of the adapter that owns each column.
        self._columns = [
            torch.tensor([self._slot[name] for name, rank in key for _ in range(rank)], dtype=torch.long)
            for key in layouts
        ]

    def covers(self, names: Iterable[str]) -> bool:
        return all(name in self._slot for name in names)

    @contextmanager
    def apply(self, row_names: list[str]) -> Iterator[None]:
        """For one forward pass: row i gets the delta of adapter `row_names[i]` (none for a name not stacked)."""
        rows = torch.tensor([self._slot.get(name, -1) for name in row_names], dtype=torch.long)
        drops = [(rows[:, None] != columns[None, :])[:, None, :] for columns in self._columns]
        for layer in self.layers:
            layer.drop = drops[layer.layout] if layer.a is not None else None
            layer.module.forward = layer  # an instance attribute: shadows PEFT's forward for this pass only
        try:
            yield
        finally:
            for layer in self.layers:
                layer.module.__dict__.pop("forward", None)
                layer.drop = None


def _plain(module: Any, name: str) -> bool:
    """Plain LoRA in this layer: no variant (DoRA, aLoRA, ...), no bias on B, finite weights and scaled B."""
    if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
        return False
    a, b = module.lora_A[name], module.lora_B[name]
    folded = b.weight * module.scaling[name]  # what the stack holds: a NaN/inf scaling is as bad as NaN weights
    return b.bias is None and bool(torch.isfinite(a.weight).all()) and bool(torch.isfinite(folded).all())
