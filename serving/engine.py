"""The CPU engine: one base model, many adapters, continuous batching on one model thread.

    engine = CPUEngine(ServingConfig(base="builtin:tiny-llama", adapters={"a": "/adapters/a"}))
    engine.start()                                   # loads the model and startup adapters, starts the thread
    stream = engine.submit(GenerationRequest(prompt_ids, "a", SamplingParams(max_tokens=16)), loop)
    async for delta in stream: ...                   # text deltas, then finish_reason + usage
    engine.shutdown()                                # finishes what is running and waiting, then stops

How a step works (the model thread, `_loop`):
1. run queued commands (adapter load/unload happen between steps, never during a forward);
2. admit waiting requests into free batch slots (at most `max_batch_size` rows, `max_loras` adapters);
3. prefill the newcomers together (left-padded) and merge them into their running batch;
4. one decode step per running batch: every row gets one token; finished rows leave.
LoRA, prompt-tuning, P-tuning, prefix-tuning and base requests share one batch: LoRA rows are routed in one pass
per layer over the batch's adapters stacked together (`serving.lora_stack`, via `serving.adapter_store`), and
prompt-learning rows carry their virtual tokens in their own embeddings / KV prefix. PEFT 0.21 refuses
`adapter_names` for DoRA, so each DoRA adapter gets a batch of its own, run with `set_adapter`.
One bad row never fails its batch: a row whose logits are NaN/inf fails alone (`NonFiniteLogits`, 500), and
when a whole prefill or decode step raises, its rows are run again one adapter at a time: the adapters that
fail alone get the error, the others go on (`_isolate`).
The asyncio server never waits on the model: `submit` only queues, and deltas come back through
`loop.call_soon_threadsafe`, one wake-up per step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from lorafleet.serving.adapter_store import MIXED, AdapterStore, LoadedAdapter
from lorafleet.serving.adapters import AdapterError, VirtualTokens, inspect_adapter
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.kv_cache import RunningBatch, make_cache
from lorafleet.serving.request_queue import Batcher, Delta, EngineStopped, RequestStream, ServingError, deliver
from lorafleet.serving.sampling import SamplingParams, TextTracker, choose_tokens, make_generator

log = logging.getLogger("lorafleet.serving")
TORCH_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnknownModel(ServingError):
    status = 404
    type = "NotFoundError"

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


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    model: str
    params: SamplingParams
    adapter: LoadedAdapter | None = None


@dataclass
class Sequence:
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


@dataclass
class EngineStats:
    waiting: int
    running: int
    adapters: int


class CPUEngine:
    def __init__(self, config: ServingConfig):
        self.config = config
        self.batcher = Batcher(config.max_queue, config.max_wait_ms / 1000)
        self.dtype = TORCH_DTYPES[config.dtype]
        self.model: Any = None
        self.store: AdapterStore | None = None
        self.tokenizer: Any = None  # the server thread's (encoding); the model thread decodes with its own copy
        self.max_model_len = 0
        self.vocab_size = 0
        self._decoder: Any = None
        self._eos: set[int] = set()
        self._commands: list[tuple[Any, Future]] = []
        self._commands_lock = threading.Lock()
        self._cohorts: dict[str, RunningBatch] = {}
        self._running = 0
        self._outbox: list[tuple[RequestStream, Delta]] = []  # this step's deltas, delivered together
        self._abort = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the base model, tokenizer and startup adapters, then start the model thread."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lorafleet.models import resolve_model

        folder = resolve_model(self.config.base)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self._decoder = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype)
        self.model.eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(limit, self.config.max_model_len or limit)
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)
        self.store = AdapterStore(self.config, self.model, self.dtype)
        for name, path in self.config.adapters.items():
            self.store.load(inspect_adapter(name, path, self.config), replace=False)
        self._thread = threading.Thread(target=self._loop, name="lorafleet-model", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests, let running and waiting ones finish (up to `timeout`), then stop."""
        self.batcher.close()
        thread = self._thread
        if thread is None:
            return
        thread.join(self.config.drain_timeout_s if timeout is None else timeout)
        if thread.is_alive():
            self._abort = True
            self.batcher.poke()
            thread.join(10)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        adapters = len(self.store) if self.store is not None else 0
        return EngineStats(waiting=self.batcher.depth(), running=self._running, adapters=adapters)

    # ---- requests (server thread) ---------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestStream:
        """Queue a request; raises UnknownModel (404), QueueFull (429) or EngineStopped (503)."""
        if not self.running:
            raise EngineStopped("the engine is not running")
        if request.model != self.config.model_id:
            request.adapter = self.store.acquire(request.model)
            if request.adapter is None:
                raise UnknownModel(request.model)
        stream = RequestStream(request=request, loop=loop)
        try:
            self.batcher.submit(stream)
        except ServingError:
            self.store.release(request.adapter)
            raise
        return stream

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
        self.batcher.poke()
        return await asyncio.wrap_future(future)

    # ---- the model thread -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)  # OpenMP: affects this thread only
        with torch.inference_mode():
            try:
                while self._iteration():
                    pass
            except Exception as exc:  # a bug, not a bad request: fail loudly, /health turns 503
                log.exception("the model thread crashed")
                self.batcher.close()
                self._fail_everything(EngineStopped(f"the engine crashed: {type(exc).__name__}: {exc}"))

    def _iteration(self) -> bool:
        """Commands, admission, one decode step per running batch; False when the engine should stop."""
        self._run_commands()
        if self._abort:
            self._fail_everything(EngineStopped("the server stopped before this request finished"))
            return False
        running = sum(len(batch) for batch in self._cohorts.values())
        if running == 0 and self.batcher.closed and self.batcher.depth() == 0:
            self._fail_commands()
            return False
        free = self.config.max_batch_size - running
        if free > 0:
            self._admit(free, idle=running == 0)
        for key in list(self._cohorts):
            self._step(key)
        self._running = sum(len(batch) for batch in self._cohorts.values())
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

    def _admit(self, free: int, *, idle: bool) -> None:
        active = {seq.adapter.internal for batch in self._cohorts.values() for seq in batch.rows if seq.adapter}

        def admit(stream: RequestStream) -> bool:
            adapter = stream.request.adapter
            if adapter is None or adapter.internal in active:
                return True
            if len(active) >= self.config.max_loras:
                return False
            active.add(adapter.internal)
            return True

        taken, dropped = self.batcher.take(free, idle=idle, admit=admit)
        for stream in dropped:
            self.store.release(stream.request.adapter)
        groups: dict[str, list[Sequence]] = {}
        for stream in taken:
            request: GenerationRequest = stream.request
            seq = Sequence(
                stream=stream,
                request=request,
                tracker=TextTracker(self._decoder, request.params.stop),
                generator=make_generator(request.params.seed),
            )
            groups.setdefault(seq.cohort, []).append(seq)
        for key, seqs in groups.items():
            try:
                batch = self._prefill(key, seqs)
            except Exception as exc:
                log.exception("prefill of %d requests failed; retrying them one adapter at a time", len(seqs))
                batch = self._isolate(seqs, exc, partial(self._prefill, key))
            if batch is None:
                continue
            if key in self._cohorts:
                self._cohorts[key].extend(batch)
            else:
                self._cohorts[key] = batch

    def _prefill(self, key: str, seqs: list[Sequence]) -> RunningBatch | None:
        """Run the prompts of `seqs` together and choose each one's first token.

        Row layout (left-padded): [pad | prefix-tuning KV | pad | prompt-tuning embeddings | prompt tokens].
        """
        virtual = [seq.adapter.virtual if seq.adapter else None for seq in seqs]
        embeds_len = [v.count if v is not None and v.embeds is not None else 0 for v in virtual]
        n_prefix = max((v.count for v in virtual if v is not None and v.prefix is not None), default=0)
        lengths = [len(seq.request.prompt_ids) + extra for seq, extra in zip(seqs, embeds_len, strict=True)]
        size, width = len(seqs), max(lengths)
        ids = torch.full((size, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(size, n_prefix + width, dtype=torch.long)
        for row, (seq, v, length) in enumerate(zip(seqs, virtual, lengths, strict=True)):
            ids[row, width - len(seq.request.prompt_ids) :] = torch.tensor(seq.request.prompt_ids)
            mask[row, n_prefix + width - length :] = 1
            if v is not None and v.prefix is not None:
                mask[row, n_prefix - v.count : n_prefix] = 1
        inputs: dict[str, Any] = {
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, n_prefix:],
        }
        if n_prefix:
            inputs["past_key_values"] = make_cache(_prefix_cache(virtual, n_prefix, self.dtype))
        with self.store.routing(key, [seq.adapter for seq in seqs]):
            if any(embeds_len):
                embeds = self.model.get_input_embeddings()(ids)  # inside: LoRA on embeddings routes per row
                for row, (v, extra, length) in enumerate(zip(virtual, embeds_len, lengths, strict=True)):
                    if extra:
                        embeds[row, width - length : width - length + extra] = v.embeds
                inputs["inputs_embeds"] = embeds
            else:
                inputs["input_ids"] = ids
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        first = self._choose(out.logits[:, -1], seqs)
        batch = RunningBatch(rows=seqs, cache=out.past_key_values, mask=mask, next_tokens=torch.tensor([]))
        return self._advance(batch, first)

    def _step(self, key: str) -> None:
        batch = self._cohorts.pop(key)
        try:
            survivors = self._decode(key, batch)
        except Exception as exc:
            log.exception("decode step of %d requests failed; retrying them one adapter at a time", len(batch))
            survivors = self._isolate(
                batch.rows, exc, lambda seqs: self._decode(key, batch.select(_rows_of(batch, seqs)))
            )
        if survivors is not None:
            self._cohorts[key] = survivors

    def _decode(self, key: str, batch: RunningBatch) -> RunningBatch | None:
        """One decode step of `batch`; when it raises, `batch` is as it was before (no token was handed out)."""
        state = batch.snapshot()
        try:
            inputs = batch.step_inputs()
            with self.store.routing(key, [seq.adapter for seq in batch.rows]):
                out = self.model(**inputs, use_cache=True)
            tokens = self._choose(out.logits[:, -1], batch.rows)
        except Exception:
            batch.restore(state)
            raise
        batch.cache = out.past_key_values
        return self._advance(batch, tokens)

    def _isolate(self, seqs: list[Sequence], exc: Exception, run) -> RunningBatch | None:
        """After a failed step of `seqs`: `run` it again per adapter; groups that fail alone get their error.

        `run(group)` does the step for a subset of `seqs` (prefill or decode) and returns its batch. Only a failed
        step pays for this; a failure that is no adapter's fault (a bug, out of memory) fails every group.
        """
        groups: dict[str | None, list[Sequence]] = {}
        for seq in seqs:
            groups.setdefault(seq.adapter.internal if seq.adapter is not None else None, []).append(seq)
        if len(groups) == 1:
            self._finish_with_error(seqs, exc)
            return None
        merged: RunningBatch | None = None
        for group in groups.values():
            try:
                batch = run(group)
            except Exception as group_exc:
                log.warning("the %d requests for %s failed alone: %s", len(group), group[0].request.model, group_exc)
                self._finish_with_error(group, group_exc)
                continue
            if batch is None:
                continue
            if merged is None:
                merged = batch
            else:
                merged.extend(batch)
        return merged

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
        return choose_tokens(logits.float(), [s.request.params for s in seqs], [s.generator for s in seqs])

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
        if token in self._eos and not params.ignore_eos:
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
            self._outbox.append(
                (
                    seq.stream,
                    Delta(
                        text=text,
                        new_tokens=1,
                        finish_reason=finish,
                        stop_reason=stop_reason,
                        prompt_tokens=len(seq.request.prompt_ids),
                        completion_tokens=seq.generated,
                    ),
                )
            )
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
        for batch in self._cohorts.values():
            self._finish_with_error(batch.rows, exc)
        self._cohorts.clear()
        for stream in self.batcher.drop_all():
            self._outbox.append((stream, Delta(error=exc)))
            self.store.release(stream.request.adapter)
        self._flush()
        self._fail_commands()


def _rows_of(batch: RunningBatch, seqs: list[Sequence]) -> list[int]:
    """The rows of `batch` that hold `seqs`."""
    wanted = {id(seq) for seq in seqs}
    return [row for row, seq in enumerate(batch.rows) if id(seq) in wanted]


def _prefix_cache(virtual: list[VirtualTokens | None], n_prefix: int, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [rows, kv_heads, n_prefix, head_dim]: each row's prefix right-aligned, zeros else."""
    template = next(v.prefix for v in virtual if v is not None and v.prefix is not None)
    layers = []
    for layer, (keys, _) in enumerate(template):
        k = torch.zeros(len(virtual), keys.shape[0], n_prefix, keys.shape[-1], dtype=dtype)
        v = torch.zeros_like(k)
        for row, tokens in enumerate(virtual):
            if tokens is not None and tokens.prefix is not None:
                k[row, :, n_prefix - tokens.count :] = tokens.prefix[layer][0]
                v[row, :, n_prefix - tokens.count :] = tokens.prefix[layer][1]
        layers.append((k, v))
    return layers
