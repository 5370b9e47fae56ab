"""The CPU engine: one base model, many adapters, continuous batching on one model thread.

    engine = CPUEngine(ServingConfig(base="builtin:tiny-llama", adapters={"a": "/adapters/a"}))
    engine.start()                                   # loads the model and startup adapters, starts the thread
    stream = engine.submit(GenerationRequest(prompt_ids, "a", SamplingParams(max_tokens=16)), loop)
    async for delta in stream: ...                   # text deltas, then finish_reason + usage
    engine.shutdown()                                # finishes what is running and waiting, then stops

How a step works (the model thread, `_loop`):
1. run queued commands (adapter load/unload happen between steps, never during a forward);
2. admit waiting requests into free batch slots (`serving.scheduler`: `max_batch_size` rows, `max_loras` adapters);
3. prefill the newcomers together (`serving.model_runner`) and merge them into their running batch;
4. one decode step per running batch: every row gets one token; finished rows leave (this module streams them).
LoRA, prompt-tuning, P-tuning, prefix-tuning and base requests share one batch: LoRA rows are routed in one pass
per layer over the batch's adapters stacked together (`serving.lora_stack`, via `serving.adapter_store`), and
prompt-learning rows carry their virtual tokens in their own embeddings / KV prefix. PEFT 0.21 refuses
`adapter_names` for DoRA, so each DoRA adapter gets a batch of its own, run with `set_adapter`.
One bad row never fails its batch: a row whose logits are NaN/inf fails alone (`NonFiniteLogits`, 500), and
when a whole prefill or decode step raises, its rows are run again one adapter at a time: the adapters that
fail alone get the error, the others go on (`serving.fault_isolation`).
The asyncio server never waits on the model: `submit` only queues, and deltas come back through
`loop.call_soon_threadsafe`, one wake-up per step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from lorafleet.serving.adapter_store import AdapterStore, LoadedAdapter
from lorafleet.serving.adapters import AdapterError, inspect_adapter
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.decode_attention import use_decode_attention
from lorafleet.serving.engine_api import (
    ChoiceFamily,
    EngineStats,
    GenerationRequest,
    NonFiniteLogits,
    UnknownModel,
)
from lorafleet.serving.fault_isolation import isolate, rows_of
from lorafleet.serving.kv_cache import RunningBatch
from lorafleet.serving.machine_defaults import Choice, batch_size, engine_dtype
from lorafleet.serving.model_runner import ModelRunner
from lorafleet.serving.packed_linear import can_pack, pack_linears
from lorafleet.serving.prefix_cache import PrefixCache
from lorafleet.serving.quantized_base import quantize_base, weight_bytes
from lorafleet.serving.request_queue import Delta, EngineStopped, RequestQueue, RequestStream, ServingError, deliver
from lorafleet.serving.scheduler import Scheduler, Sequence

log = logging.getLogger("lorafleet.serving")


class CPUEngine:
    """The `Engine` of `serving.engine_api` on this machine's CPU (or one CUDA device, same code)."""

    def __init__(self, config: ServingConfig):
        self.config = config
        self.queue = RequestQueue(config.max_queue, config.max_wait_ms / 1000)
        self.scheduler = Scheduler(config, self.queue)
        self.dtype_choice: Choice | None = None  # the dtype, as set or chosen for this machine, once loaded
        self.dtype: torch.dtype = torch.float32
        self.batch_choice: Choice | None = None  # max_batch_size: set, or chosen from memory once the model loads
        self.max_batch_size = 0
        self.model: Any = None
        self.store: AdapterStore | None = None
        self.runner: ModelRunner | None = None
        self.tokenizer: Any = None  # the server thread's (encoding); the model thread decodes with its own copy
        self.max_model_len = 0
        self.vocab_size = 0
        self.eos_ids: set[int] = set()
        self.quantization: str | None = None  # the base's quantization method (int8, int4, ...), None: float
        self.weights_mb = 0.0  # the base's weights as served (packed copies and int8 layers included)
        self._decoder: Any = None
        self._commands: list[tuple[Any, Future]] = []
        self._commands_lock = threading.Lock()
        self._running = 0
        self._outbox: list[tuple[RequestStream, Delta]] = []  # this step's deltas, delivered together
        self._abort = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the model thread and wait while it loads the base model, tokenizer and startup adapters (their
        errors are raised here). Every torch operation of the engine runs on that one thread: OpenMP keeps a
        team of worker threads per calling thread, and with a second team (the caller's, from loading) on the
        same cores its workers stop spin-waiting between operations, measured here at 1.6x the decode step."""
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(loaded,), name="lorafleet-model", daemon=True)
        self._thread.start()
        loaded.result()

    def _load(self) -> None:
        from lorafleet.model_loading import load_base_model_weights, load_base_tokenizer
        from lorafleet.models import resolve_model

        self.dtype_choice = engine_dtype(self.config.dtype)
        self.dtype = self.dtype_choice.value
        folder = resolve_model(self.config.base)
        self.tokenizer = load_base_tokenizer(folder)
        self._decoder = load_base_tokenizer(folder)
        self.model = load_base_model_weights(folder, dtype=self.dtype)
        self.model.eval()
        self.quantization = quantize_base(self.model, folder, self.config.quantization)
        if self.config.packed_weights and can_pack(self.dtype, self.model.device):
            pack_linears(self.model)  # what quantization left in float32
        self.weights_mb = weight_bytes(self.model) / 1e6
        use_decode_attention(self.model)
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(limit, self.config.max_model_len or limit)
        if self.config.max_batch_size is None:
            self.batch_choice = batch_size(self.model.config, self.dtype, self.max_model_len)
        else:
            self.batch_choice = Choice(self.config.max_batch_size, "set explicitly")
        self.max_batch_size = self.scheduler.max_batch_size = self.batch_choice.value
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.store = AdapterStore(self.config, self.model, self.dtype)
        prefixes = PrefixCache(int(self.config.prefix_cache_mb * 2**20)) if self.config.prefix_cache_mb else None
        self.runner = ModelRunner(self.model, self.store, self.dtype, self.tokenizer.pad_token_id or 0, prefixes)
        for name, path in self.config.adapters.items():
            self.store.load(inspect_adapter(name, path, self.config), replace=False)

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests, let running and waiting ones finish (up to `timeout`), then stop."""
        self.queue.close()
        thread = self._thread
        if thread is None:
            return
        thread.join(self.config.drain_timeout_s if timeout is None else timeout)
        if thread.is_alive():
            self._abort = True
            self.queue.poke()
            thread.join(10)

    def describe_settings(self) -> str:
        """The settings chosen for this machine, and why (printed at start)."""
        dtype = str(self.dtype).removeprefix("torch.")
        batch = self.batch_choice.reason if self.batch_choice else "not loaded"
        return (
            f"dtype {dtype} ({self.dtype_choice.reason if self.dtype_choice else 'not loaded'}); "
            f"max_batch_size {self.max_batch_size} ({batch}); base weights {self.quantization or 'not quantized'} "
            f"({self.weights_mb:.1f} MB)"
        )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        adapters = len(self.store) if self.store is not None else 0
        prefilled = self.runner.prefilled_rows if self.runner is not None else 0
        return EngineStats(self.queue.depth(), self._running, adapters, prefilled)

    # ---- requests (server thread) ---------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestStream:
        """Queue a request; raises UnknownModel (404), QueueFull (429) or EngineStopped (503)."""
        return self._submit_all([request], loop)[0]

    def submit_choices(
        self, request: GenerationRequest, n: int, loop: asyncio.AbstractEventLoop
    ) -> list[RequestStream]:
        """Queue the `n` choices of one request (prefilled once, sampled apart, choice i seeded seed + i)."""
        if n == 1:
            return [self.submit(request, loop)]
        family = ChoiceFamily(n)
        choices = [replace(request, params=request.params.for_choice(i), family=family) for i in range(n)]
        return self._submit_all(choices, loop)

    def _submit_all(self, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop) -> list[RequestStream]:
        if not self.running:
            raise EngineStopped("the engine is not running")
        streams = []
        try:
            for request in requests:
                if request.model != self.config.model_id:
                    request.adapter = self.store.acquire(request.model)
                    if request.adapter is None:
                        raise UnknownModel(request.model)
                streams.append(RequestStream(request=request, loop=loop))
            self.queue.submit(*streams)
        except ServingError:
            for request in requests:
                self.store.release(request.adapter)
            raise
        return streams

    def has_model(self, name: str) -> bool:
        return name == self.config.model_id or (self.store is not None and name in self.store)

    def adapters(self) -> list[LoadedAdapter]:
        return self.store.listing() if self.store is not None else []

    # ---- adapters (server thread → model thread) -----------------------------------------------------------

    async def load_adapter(self, name: str, path: str, *, replace: bool = False) -> LoadedAdapter:
        """Validate and load (or with `replace`, reload) an adapter; AdapterError says why not."""
        if not replace and self.store is not None and name in self.store:
            raise AdapterError(
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True.",
                param="lora_name",
            )
        spec = await asyncio.to_thread(inspect_adapter, name, path, self.config)
        adapter = await self._call(partial(self.store.load, spec, replace=replace))
        log.info("loaded adapter %s (%s) from %s", name, spec.kind, spec.path)
        return adapter

    async def unload_adapter(self, name: str) -> None:
        await self._call(partial(self.store.unload, name))
        log.info("unloaded adapter %s", name)

    async def _call(self, command) -> Any:
        """Run `command` on the model thread between two steps."""
        if not self.running:
            raise EngineStopped("the engine is not running")
        future: Future = Future()
        with self._commands_lock:
            self._commands.append((command, future))
        self.queue.poke()
        return await asyncio.wrap_future(future)

    # ---- the model thread -----------------------------------------------------------------------------------

    def _loop(self, loaded: Future) -> None:
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)  # OpenMP: affects this thread only
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which raises it in the caller
            loaded.set_exception(exc)
            return
        loaded.set_result(None)
        with torch.inference_mode():
            try:
                while self._iteration():
                    pass
            except Exception as exc:  # a bug, not a bad request: fail loudly, /health turns 503
                log.exception("the model thread crashed")
                self.queue.close()
                self._fail_everything(EngineStopped(f"the engine crashed: {type(exc).__name__}: {exc}"))

    def _iteration(self) -> bool:
        """Commands, admission, one decode step per running batch; False when the engine should stop."""
        self._run_commands()
        if self._abort:
            self._fail_everything(EngineStopped("the server stopped before this request finished"))
            return False
        if self.scheduler.done():
            self._fail_commands()
            return False
        self._admit()
        for key in list(self.scheduler.cohorts):
            self._step(key)
        self._running = self.scheduler.running()
        self._flush()
        return True

    def _run_commands(self) -> None:
        with self._commands_lock:
            commands, self._commands = self._commands, []
        for command, future in commands:
            try:
                future.set_result(command())
            except Exception as exc:
                future.set_exception(exc)
        self.store.sweep()

    def _fail_commands(self) -> None:
        with self._commands_lock:
            commands, self._commands = self._commands, []
        for _, future in commands:
            future.set_exception(EngineStopped("the engine stopped"))

    def _admit(self) -> None:
        groups, dropped = self.scheduler.admit(self._decoder)
        for stream in dropped:
            self.store.release(stream.request.adapter)
        for key, seqs in groups.items():
            try:
                batch = self._prefill(key, seqs)
            except Exception as exc:
                log.exception("prefill of %d requests failed; retrying them one adapter at a time", len(seqs))
                batch = isolate(seqs, exc, partial(self._prefill, key), self._finish_with_error)
            if batch is not None:
                self.scheduler.join(key, batch)

    def _prefill(self, key: str, seqs: list[Sequence]) -> RunningBatch | None:
        batch, first = self.runner.prefill(key, seqs)
        return self._advance(batch, first)

    def _step(self, key: str) -> None:
        batch = self.scheduler.cohorts.pop(key)
        try:
            survivors = self._decode(key, batch)
        except Exception as exc:
            log.exception("decode step of %d requests failed; retrying them one adapter at a time", len(batch))
            survivors = isolate(
                batch.rows,
                exc,
                lambda seqs: self._decode(key, batch.select(rows_of(batch, seqs))),
                self._finish_with_error,
            )
        if survivors is not None:
            self.scheduler.cohorts[key] = survivors

    def _decode(self, key: str, batch: RunningBatch) -> RunningBatch | None:
        return self._advance(batch, self.runner.decode(key, batch))

    # ---- streaming the output (model thread) ---------------------------------------------------------------

    def _advance(self, batch: RunningBatch, tokens: list[int | None]) -> RunningBatch | None:
        """Hand each row its new token; rows that finished or got none (NaN logits) leave (None: none left)."""
        batch.next_tokens = torch.tensor([token if token is not None else 0 for token in tokens])
        keep = []
        for row, (seq, token) in enumerate(zip(batch.rows, tokens, strict=True)):
            if token is None:
                self._finish_with_error([seq], NonFiniteLogits(seq.request.model, adapter=seq.adapter is not None))
            elif self._accept(seq, token):
                keep.append(row)
        if not keep:
            return None
        if len(keep) < len(batch):
            batch.keep(keep)
        return batch

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Record `token` for `seq` and stream what it adds; False when the sequence is done."""
        if seq.stream.cancelled:
            self.store.release(seq.adapter)
            return False
        params = seq.request.params
        seq.generated += 1
        finish, stop_reason, text = None, None, ""
        if token in self.eos_ids and not params.ignore_eos:
            finish, text = "stop", seq.tracker.flush()
        else:
            text, hit = seq.tracker.push(token)
            if hit is not None:
                finish, stop_reason = "stop", hit
            elif (
                seq.generated >= params.max_tokens or len(seq.request.prompt_ids) + seq.generated >= self.max_model_len
            ):
                finish, text = "length", text + seq.tracker.flush()
        if text or finish:
            delta = Delta(
                text=text,
                new_tokens=1,
                finish_reason=finish,
                stop_reason=stop_reason,
                prompt_tokens=len(seq.request.prompt_ids),
                completion_tokens=seq.generated,
            )
            self._outbox.append((seq.stream, delta))
        if finish:
            self.store.release(seq.adapter)
            return False
        return True

    def _flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            deliver(outbox)

    def _finish_with_error(self, seqs: list[Sequence], exc: Exception) -> None:
        for seq in seqs:
            self._outbox.append((seq.stream, Delta(error=exc)))
            self.store.release(seq.adapter)

    def _fail_everything(self, exc: Exception) -> None:
        for batch in self.scheduler.take_all():
            self._finish_with_error(batch.rows, exc)
        for stream in self.queue.drop_all():
            self._outbox.append((stream, Delta(error=exc)))
            self.store.release(stream.request.adapter)
        self._flush()
        self._fail_commands()
