"""What the API routes need from an engine: the request they submit, the errors they map, the `Engine` protocol.

The CPU engine (`serving.engine.CPUEngine`) implements it; the handlers in `serving.handlers` depend on this
module only, so another engine (a client of a vLLM server, a fake in tests) can stand behind the same routes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from lorafleet.serving.adapter_store import LoadedAdapter
from lorafleet.serving.request_queue import RequestStream, ServingError
from lorafleet.serving.sampling import SamplingParams


class UnknownModel(ServingError):
    status = 404
    type = "NotFoundError"
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.", param="model")


class NonFiniteLogits(ServingError):
    """The model gave a row NaN/inf logits: that adapter's weights (or the base's) are broken, not the request."""

    def __init__(self, model: str, *, adapter: bool):
        super().__init__(
            f"{'adapter' if adapter else 'model'} {model} produced non-finite logits (NaN or inf), so no token could "
            "be chosen; its weights are likely broken (a diverged training run?): load a good version",
            param="model",
        )


@dataclass(eq=False)
class ChoiceFamily:
    """The `n` choices of one API request: one prompt, prefilled once, then `size` sampling streams."""

    size: int


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    model: str
    params: SamplingParams
    adapter: LoadedAdapter | None = None
    family: ChoiceFamily | None = None  # set by `submit_choices` on each of the n siblings


@dataclass
class EngineStats:
    waiting: int
    running: int
    adapters: int
    prefilled_rows: int = 0  # prompts run through the model since start (n choices of one request count once)


class Engine(Protocol):
    """An engine behind the OpenAI routes: tokenizer and limits, generation, and runtime adapter updates."""

    tokenizer: Any
    max_model_len: int
    max_batch_size: int  # rows decoded together (the setting, or what the engine chose for this machine)
    vocab_size: int

    @property
    def running(self) -> bool: ...

    def start(self) -> None: ...

    def shutdown(self, timeout: float | None = None) -> None: ...

    def stats(self) -> EngineStats: ...

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestStream: ...

    def submit_choices(
        self, request: GenerationRequest, n: int, loop: asyncio.AbstractEventLoop
    ) -> list[RequestStream]: ...

    def has_model(self, name: str) -> bool: ...

    def adapters(self) -> list[LoadedAdapter]: ...

    async def load_adapter(self, name: str, path: str, *, replace: bool = False) -> LoadedAdapter: ...

    async def unload_adapter(self, name: str) -> None: ...
