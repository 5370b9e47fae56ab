"""The adapters loaded on the engine's base model, and the routing of batch rows to them.

LoRA and DoRA weights live in one `PeftModel` wrapped around the base, each under an internal PEFT name that is
new for every load (`lf1`, `lf2`, ...): a reload under the same public name loads next to the old weights and
then moves the name over, so requests admitted before keep a consistent adapter and every later request gets
the new weights. Replaced or unloaded weights are deleted once no request holds them (`refs`).
Prompt-learning adapters are constant tensors (`VirtualTokens`), outside PEFT.

Routing a mixed batch: plain-LoRA layers run one pass for all rows over the batch's adapters stacked along the
rank dimension (`serving.lora_stack`); the other LoRA layers and PEFT's auxiliary wrappers get PEFT's
`adapter_names` forward. The stack is built for a set of adapters that covers the batch and is dropped at every
load and delete, so no pass ever reads copied weights of an adapter that has since changed.

Thread rules: the name table is read and reference-counted from the server thread under `lock`; everything that
touches the model (load, delete, `routing`) runs on the model thread only.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from lorafleet.serving.adapters import AdapterError, AdapterSpec, VirtualTokens, read_virtual_tokens
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.lora_stack import LoraStack

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
MIXED = "mixed"  # the batch that LoRA, prompt-learning and base rows share


@dataclass
class LoadedAdapter:
    spec: AdapterSpec
    internal: str  # the PEFT adapter name (unique per load)
    created: int = field(default_factory=lambda: int(time.time()))
    virtual: VirtualTokens | None = None
    refs: int = 0  # requests submitted and not finished
    retired: bool = False  # unloaded or replaced: deleted once refs reaches 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def cohort(self) -> str:
        """Which running batch its rows join: PEFT 0.21 refuses mixed batches with DoRA, so DoRA runs alone."""
        return f"dora:{self.internal}" if self.kind == "dora" else MIXED

    @property
    def peft_name(self) -> str:
        return self.internal if self.kind in ("lora", "dora") else BASE


class AdapterStore:
    def __init__(self, config: ServingConfig, model: torch.nn.Module, dtype: torch.dtype):
        self.config, self.model, self.dtype = config, model, dtype
        self.lock = threading.Lock()
        self.peft: Any = None  # the PeftModel around `model`, made at the first LoRA load
        self._by_name: dict[str, LoadedAdapter] = {}
        self._retired: list[LoadedAdapter] = []
        self._ids = itertools.count(1)
        self._hooked: list[torch.nn.Module] = []  # every PEFT layer: LoRA layers and auxiliary wrappers
        self._hooked_linear: list[torch.nn.Module] = []  # the plain LoRA Linear layers among them
        self._hooked_not_linear: list[torch.nn.Module] = []
        self._active: str | None = None
        self.stack_lora = True  # False: mixed batches take PEFT's `adapter_names` forward in every LoRA layer
        self._stack: LoraStack | None = None

    # ---- server thread --------------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def listing(self) -> list[LoadedAdapter]:
        with self.lock:
            return sorted(self._by_name.values(), key=lambda adapter: adapter.name)

    def acquire(self, name: str) -> LoadedAdapter | None:
        """The adapter serving `name` now, held for one request (None: no such adapter)."""
        with self.lock:
            adapter = self._by_name.get(name)
            if adapter is not None:
                adapter.refs += 1
            return adapter

    def release(self, adapter: LoadedAdapter | None) -> None:
        if adapter is not None:
            with self.lock:
                adapter.refs -= 1

    # ---- model thread ---------------------------------------------------------------------------------------

    def load(self, spec: AdapterSpec, *, replace: bool) -> LoadedAdapter:
        with self.lock:
            old = self._by_name.get(spec.name)
            if old is not None and not replace:
                raise AdapterError(
                    f"The lora adapter '{spec.name}' has already been loaded. If you want to load the adapter in "
                    "place, set 'load_inplace' to True.",
                    param="lora_name",
                )
            if old is None and len(self._by_name) >= self.config.cpu_adapter_limit:
                raise AdapterError(
                    f"{len(self._by_name)} adapters are loaded, the most this server holds "
                    f"(max_cpu_loras={self.config.cpu_adapter_limit}): unload one first",
                    param="lora_name",
                )
        adapter = LoadedAdapter(spec=spec, internal=f"lf{next(self._ids)}")
        try:
            if spec.kind in ("lora", "dora"):
                self._load_peft(spec, adapter.internal)
            else:
                adapter.virtual = read_virtual_tokens(spec, self.model.config, self.dtype)
        except AdapterError:
            raise
        except Exception as exc:
            raise AdapterError(f"adapter {spec.name!r} could not be loaded from {spec.path}: {exc}") from exc
        with self.lock:
            old = self._by_name.get(spec.name)
            self._by_name[spec.name] = adapter
            if old is not None:
                old.retired = True
                self._retired.append(old)
        self.sweep()
        return adapter

    def unload(self, name: str) -> None:
        with self.lock:
            adapter = self._by_name.pop(name, None)
            if adapter is None:
                raise AdapterError(f"The lora adapter '{name}' cannot be found.", param="lora_name", status=404)
            adapter.retired = True
            self._retired.append(adapter)
        self.sweep()

    def sweep(self) -> None:
        """Delete the weights of replaced/unloaded adapters that no request holds any more."""
        with self.lock:
            done = [adapter for adapter in self._retired if adapter.refs <= 0]
            self._retired = [adapter for adapter in self._retired if adapter.refs > 0]
        deleted = False
        for adapter in done:
            if self.peft is not None and adapter.internal in self.peft.peft_config:
                self.peft.delete_adapter(adapter.internal)
                deleted = True
        if deleted:
            self._active = None
            self._refresh_hooks()

    def _load_peft(self, spec: AdapterSpec, internal: str) -> None:
        from peft import PeftModel

        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(spec.path), adapter_name=internal)
            else:
                self.peft.load_adapter(str(spec.path), adapter_name=internal)
        except Exception:
            if self.peft is not None and internal in self.peft.peft_config:
                self.peft.delete_adapter(internal)  # never leave a half-loaded adapter behind
            self._refresh_hooks()
            raise
        self.peft.eval()
        self._active = None
        self._refresh_hooks()

    def _refresh_hooks(self) -> None:
        from peft.tuners.lora import LoraLayer

        try:
            from peft.utils.other import AuxiliaryTrainingWrapper
        except ImportError:  # an older PEFT
            AuxiliaryTrainingWrapper = LoraLayer  # noqa: N806
        from peft.tuners.lora.layer import Linear

        self._hooked = [m for m in self.model.modules() if isinstance(m, LoraLayer | AuxiliaryTrainingWrapper)]
        self._hooked_linear = [m for m in self._hooked if type(m) is Linear and not m.merged]
        self._hooked_not_linear = [m for m in self._hooked if m not in self._hooked_linear]
        self._stack = None  # weights were added or deleted: the next mixed pass stacks them afresh

    def _stack_for(self, names: set[str]) -> LoraStack:
        """A stack that holds every adapter in `names`: the current one if it does, else a new one.

        A new stack keeps the adapters of the old one while that stays within `max_loras` (the adapters of all
        running batches), so a prefill of newcomers and the decode step of the running batch share one stack.
        """
        if self._stack is None or not self._stack.covers(names):
            wanted = names | set(self._stack.names if self._stack is not None else ())
            if len(wanted) > self.config.max_loras:
                wanted = names
            self._stack = LoraStack(sorted(wanted), self._hooked)
        return self._stack

    @contextmanager
    def routing(self, cohort: str, adapters: list[LoadedAdapter | None]) -> Iterator[None]:
        """For one forward pass: each batch row goes through its own adapter (or none)."""
        if self.peft is None:
            yield
            return
        if cohort != MIXED:
            internal = adapters[0].internal
            if self._active != internal:
                self.peft.base_model.set_adapter(internal)
                self._active = internal
            yield
            return
        names = [adapter.peft_name if adapter is not None else BASE for adapter in adapters]
        hooked, stacked = self._hooked, nullcontext()
        if all(name == BASE for name in names):
            hooked, stacked = self._hooked_not_linear, bypassing(self._hooked_linear)
        elif self.stack_lora:
            stack = self._stack_for({name for name in names if name != BASE})
            hooked, stacked = stack.fallback, stack.apply(names)
        hook = partial(_inject_adapter_names, adapter_names=names)
        handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in hooked]
        try:
            with stacked:
                yield
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def bypassing(layers: list[torch.nn.Module]) -> Iterator[None]:
    """For one forward pass of base rows only: each LoRA Linear runs its base layer alone (no masked LoRA work)."""
    for layer in layers:
        layer.forward = layer.base_layer.forward  # an instance attribute: shadows PEFT's forward for this pass
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def _inject_adapter_names(module, args, kwargs, adapter_names):
    """What PEFT's own `_enable_peft_forward_hooks` does, but removed even when the forward raises."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs
