"""Who runs next: the running batches (one per cohort) and admission of waiting requests into free slots.

A cohort is a running batch that one forward pass serves: `mixed` (LoRA, prompt-learning and base rows together)
or one DoRA adapter alone (PEFT refuses mixed batches with DoRA). Admission takes the oldest waiting requests
that fit: at most `max_batch_size` rows in all and at most `max_loras` distinct adapters among running rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.serving.adapter_store import MIXED, LoadedAdapter
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.engine_api import GenerationRequest
from lorafleet.serving.kv_cache import RunningBatch
from lorafleet.serving.request_queue import RequestQueue, RequestStream
from lorafleet.serving.sampling import TextTracker, make_generator


@dataclass
class Sequence:
    """One request while it runs: its stream, detokenizer state, RNG and how many tokens it has."""

    stream: RequestStream
    request: GenerationRequest
    tracker: TextTracker
    generator: torch.Generator
    generated: int = 0

    @property
    def adapter(self) -> LoadedAdapter | None:
        return self.request.adapter

    @property
    def cohort(self) -> str:
        return self.adapter.cohort if self.adapter is not None else MIXED


class Scheduler:
    def __init__(self, config: ServingConfig, queue: RequestQueue):
        self.config = config
        self.queue = queue
        self.max_batch_size = config.max_batch_size or 1  # the engine sets the value it chose at start
        self.cohorts: dict[str, RunningBatch] = {}

    def running(self) -> int:
        return sum(len(batch) for batch in self.cohorts.values())

    def done(self) -> bool:
        """Nothing runs, nothing waits, and nothing new can come: the model thread may stop."""
        return self.running() == 0 and self.queue.closed and self.queue.depth() == 0

    def admit(self, decoder) -> tuple[dict[str, list[Sequence]], list[RequestStream]]:
        """(newly admitted sequences by cohort, cancelled streams dropped from the queue)."""
        running = self.running()
        free = self.max_batch_size - running
        if free <= 0:
            return {}, []
        active = {seq.adapter.internal for batch in self.cohorts.values() for seq in batch.rows if seq.adapter}

        def fits(stream: RequestStream) -> bool:
            adapter = stream.request.adapter
            if adapter is None or adapter.internal in active:
                return True
            if len(active) >= self.config.max_loras:
                return False
            active.add(adapter.internal)
            return True

        taken, dropped = self.queue.take(free, idle=running == 0, admit=fits)
        groups: dict[str, list[Sequence]] = {}
        for stream in taken:
            request: GenerationRequest = stream.request
            seq = Sequence(
                stream=stream,
                request=request,
                tracker=TextTracker(decoder, request.params.stop),
                generator=make_generator(request.params.seed),
            )
            groups.setdefault(seq.cohort, []).append(seq)
        return groups, dropped

    def join(self, key: str, batch: RunningBatch) -> None:
        """Newly prefilled rows join their cohort's running batch (or start it)."""
        if key in self.cohorts:
            self.cohorts[key].extend(batch)
        else:
            self.cohorts[key] = batch

    def take_all(self) -> list[RunningBatch]:
        batches = list(self.cohorts.values())
        self.cohorts.clear()
        return batches
