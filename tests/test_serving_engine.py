"""The CPU engine without HTTP: mixed-adapter batches give each adapter's own outputs, sampling, stops, reloads.

References are plain PEFT: `PeftModel.from_pretrained(base, adapter)` + `set_adapter` + greedy `generate`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.serving.adapters import AdapterError, inspect_adapter
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.engine import CPUEngine
from lorafleet.serving.engine_api import GenerationRequest, UnknownModel
from lorafleet.serving.request_queue import EngineStopped, QueueFull
from lorafleet.serving.sampling import SamplingParams, TextTracker, choose_tokens, make_generator
from lorafleet.serving.testing import make_adapter

PROMPTS = ["Hello there", "The quick brown fox jumps over", "x"]
KINDS = {"a": "lora", "b": "lora-all", "d": "dora", "pt": "prompt", "px": "prefix", "pe": "ptuning"}
NEW_TOKENS = 10


def adapters_of_every_kind(tiny_model_dir: str, root: Path) -> Path:
    """One random adapter per entry of KINDS under `root`."""
    for seed, (name, method) in enumerate(KINDS.items(), start=1):
        make_adapter(tiny_model_dir, root / name, method, seed=seed)
    return root


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return adapters_of_every_kind(tiny_model_dir, tmp_path_factory.mktemp("engine-adapters"))


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_dir):
    config = ServingConfig(
        base=tiny_model_dir,
        served_model_name="tiny",
        adapters={name: str(adapter_dir / name) for name in KINDS},
        max_loras=8,
        max_batch_size=16,
        torch_threads=1,
    )
    engine = CPUEngine(config)
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def references(tiny_model_dir, adapter_dir, engine) -> dict[str, list[str]]:
    """Greedy continuations of PROMPTS by plain PEFT, per adapter ("tiny" = the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def greedy(model) -> list[str]:
        outs = []
        for prompt in PROMPTS:
            ids = engine.tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
            outs.append(engine.tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True))
        return outs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster, and steadier on a busy machine
    refs = {"tiny": greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())}
    loras = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir / "a", "a")
    loras.load_adapter(adapter_dir / "b", "b")
    loras.load_adapter(adapter_dir / "d", "d")
    loras.eval()
    for name in ("a", "b", "d"):
        loras.set_adapter(name)
        refs[name] = greedy(loras)
    for name in ("pt", "px", "pe"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir / name)
        refs[name] = greedy(model.eval())
    torch.set_num_threads(threads)
    return refs


async def _generate(engine: CPUEngine, prompt: str, model: str, params: SamplingParams, delay: float = 0):
    await asyncio.sleep(delay)
    ids = engine.tokenizer(prompt).input_ids
    stream = engine.submit(GenerationRequest(ids, model, params), asyncio.get_running_loop())
    text, last = [], None
    async for delta in stream:
        if delta.error:
            raise delta.error
        text.append(delta.text)
        last = delta
    return "".join(text), last


def run(engine, prompt, model, params):
    return asyncio.run(_generate(engine, prompt, model, params))


def run_many(engine, jobs):
    async def main():
        return await asyncio.gather(*(_generate(engine, *job) for job in jobs))

    return asyncio.run(main())


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def test_adapters_change_outputs(references):
    texts = [tuple(outs) for outs in references.values()]
    assert len(set(texts)) == len(texts), "every adapter should answer differently from the others and the base"


def test_each_adapter_alone_matches_peft(engine, references):
    for model, expected in references.items():
        got = [run(engine, prompt, model, GREEDY)[0] for prompt in PROMPTS]
        assert got == expected, model


def test_mixed_batch_matches_peft_and_joins_midway(engine, references):
    """All adapters and the base, concurrently, staggered so newcomers join a running batch."""
    jobs, expected = [], []
    for i, (model, outs) in enumerate(references.items()):
        for j, prompt in enumerate(PROMPTS):
            jobs.append((prompt, model, GREEDY, 0.004 * (i * len(PROMPTS) + j)))
            expected.append(outs[j])
    results = run_many(engine, jobs)
    assert [text for text, _ in results] == expected
    assert all(last.finish_reason == "length" and last.completion_tokens == NEW_TOKENS for _, last in results)


def test_a_batch_of_base_rows_skips_the_lora_layers(engine, references, monkeypatch):
    """Base rows alone: no LoRA work at all (neither PEFT's forward nor a stacked pass), the base's answers; a
    batch with one adapter row in it goes through the LoRA layers again."""
    from peft.tuners.lora.layer import Linear

    from lorafleet.serving.lora_stack import StackedLayer

    lora_passes = []

    def counted(method):
        return lambda self, *args, **kwargs: lora_passes.append(1) or method(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "forward", counted(Linear.forward))
    monkeypatch.setattr(StackedLayer, "__call__", counted(StackedLayer.__call__))
    base_only = run_many(engine, [(prompt, "tiny", GREEDY, 0) for prompt in PROMPTS])
    assert [text for text, _ in base_only] == references["tiny"] and not lora_passes
    with_adapter = run_many(engine, [(PROMPTS[0], "tiny", GREEDY, 0), (PROMPTS[1], "a", GREEDY, 0)])
    assert [text for text, _ in with_adapter] == [references["tiny"][0], references["a"][1]] and lora_passes


def test_iteration_level_batching_overlaps_requests(engine):
    """A short request sent while a long one runs finishes first (it joined the running batch)."""
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    finished = []

    async def timed(prompt, model, params, delay):
        result = await _generate(engine, prompt, model, params, delay)
        finished.append(model)
        return result

    async def main():
        await asyncio.gather(timed("long one", "a", long, 0), timed("short", "b", short, 0.05))

    asyncio.run(main())
    assert finished == ["b", "a"]


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    first = run(engine, "Hello there", "a", params)[0]
    alone_again = run(engine, "Hello there", "a", params)[0]
    with_traffic = run_many(engine, [("Hello there", "a", params), ("other", "b", GREEDY), ("x", "pt", GREEDY)])[0][0]
    other_seed = run(engine, "Hello there", "a", SamplingParams(max_tokens=12, temperature=1.0, seed=99))[0]
    assert first == alone_again == with_traffic
    assert other_seed != first


def test_stop_string_cuts_the_text(engine, references):
    model, index, full, at = next(
        (model, index, text, at)
        for model, outs in references.items()
        for index, text in enumerate(outs)
        for at in range(1, len(text) - 2)
        if "\ufffd" not in text[: at + 2] and text.index(text[at : at + 2]) == at
    )
    stop = full[at : at + 2]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, stop=("never", stop), ignore_eos=True)
    text, last = run(engine, PROMPTS[index], model, params)
    assert text == full[:at]
    assert (last.finish_reason, last.stop_reason) == ("stop", stop)


def test_eos_ends_the_sequence_unless_ignored(engine):
    saved = engine.eos_ids
    engine.eos_ids = set(range(len(engine.tokenizer)))  # whatever comes first is an end-of-text token
    try:
        text, last = run(engine, PROMPTS[0], "a", SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
        assert (text, last.finish_reason, last.stop_reason, last.completion_tokens) == ("", "stop", None, 1)
        text, last = run(engine, PROMPTS[0], "a", GREEDY)
        assert (last.finish_reason, last.completion_tokens) == ("length", NEW_TOKENS)
    finally:
        engine.eos_ids = saved


def test_reload_in_place_never_serves_stale_weights(engine, adapter_dir, references):
    async def main():
        await engine.load_adapter("swap", str(adapter_dir / "a"))
        before = (await _generate(engine, PROMPTS[0], "swap", GREEDY))[0]
        with pytest.raises(AdapterError, match="already been loaded"):
            await engine.load_adapter("swap", str(adapter_dir / "b"))
        await engine.load_adapter("swap", str(adapter_dir / "b"), replace=True)
        after = (await _generate(engine, PROMPTS[0], "swap", GREEDY))[0]
        await engine.unload_adapter("swap")
        return before, after

    peft_names_before = set(engine.store.peft.peft_config)
    before, after = asyncio.run(main())
    assert (before, after) == (references["a"][0], references["b"][0])
    assert set(engine.store.peft.peft_config) == peft_names_before, "replaced and unloaded weights are deleted"
    with pytest.raises(UnknownModel):
        run(engine, PROMPTS[0], "swap", GREEDY)


def test_failed_load_leaves_nothing_behind(engine, tiny_model_dir, adapter_dir, tmp_path, references):
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir / "a", broken)  # says r=8 ...
    rank4 = make_adapter(tiny_model_dir, tmp_path / "rank4", "lora", rank=4)
    shutil.copy(rank4 / "adapter_model.safetensors", broken / "adapter_model.safetensors")  # ... holds r=4
    config = engine.config.model_copy(update={"adapter_roots": [str(tmp_path)]})
    peft_names = set(engine.store.peft.peft_config)

    async def load():
        original, engine.config = engine.config, config
        try:
            await engine.load_adapter("broken", str(broken))
        finally:
            engine.config = original

    with pytest.raises(AdapterError, match="could not be loaded"):
        asyncio.run(load())
    assert set(engine.store.peft.peft_config) == peft_names and not engine.has_model("broken")
    assert run(engine, PROMPTS[0], "a", GREEDY)[0] == references["a"][0]


def test_unknown_model(engine):
    with pytest.raises(UnknownModel, match="The model `nope` does not exist."):
        run(engine, "x", "nope", GREEDY)


def test_max_loras_and_queue_bound(tiny_model_dir, adapter_dir, references):
    config = ServingConfig(
        base=tiny_model_dir,
        served_model_name="tiny",
        adapters={"a": str(adapter_dir / "a"), "b": str(adapter_dir / "b")},
        max_loras=1,
        max_batch_size=4,
        max_queue=3,
        torch_threads=1,
    )
    engine = CPUEngine(config)
    engine.start()
    try:
        results = run_many(engine, [(PROMPTS[0], "a", GREEDY), (PROMPTS[0], "b", GREEDY), (PROMPTS[0], "a", GREEDY)])
        assert [text for text, _ in results] == [references["a"][0], references["b"][0], references["a"][0]]

        async def flood():
            long = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
            outcomes = []
            for _ in range(10):
                try:
                    engine.submit(GenerationRequest([1, 2, 3], "a", long), asyncio.get_running_loop())
                    outcomes.append("ok")
                except QueueFull:
                    outcomes.append("full")
            return outcomes

        outcomes = asyncio.run(flood())
        assert outcomes.count("full") >= 10 - 4 - 3
    finally:
        engine.shutdown(timeout=0.5)
    with pytest.raises(EngineStopped):
        run(engine, "x", "a", GREEDY)


def test_shutdown_finishes_in_flight_requests(tiny_model_dir):
    engine = CPUEngine(ServingConfig(base=tiny_model_dir, max_batch_size=2, torch_threads=1))
    engine.start()
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def main():
        tasks = [asyncio.create_task(_generate(engine, f"p{i}", engine.config.model_id, params)) for i in range(4)]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(engine.shutdown)
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert [last.finish_reason for _, last in results] == ["length"] * 4


def test_adapter_checks(tiny_model_dir, adapter_dir, tmp_path):
    config = ServingConfig(base=tiny_model_dir, adapter_roots=[str(adapter_dir), str(tmp_path)])
    assert inspect_adapter("ok", adapter_dir / "a", config).kind == "lora"
    assert inspect_adapter("ok", adapter_dir / "d", config).kind == "dora"
    assert inspect_adapter("ok", adapter_dir / "px", config).kind == "prefix"
    with pytest.raises(AdapterError, match="invalid adapter name"):
        inspect_adapter("../a", adapter_dir / "a", config)
    with pytest.raises(AdapterError, match="outside the allowed adapter roots"):
        inspect_adapter("x", adapter_dir / ".." / ".." / "elsewhere", config)
    link = tmp_path / "sneaky"
    link.symlink_to(Path(tiny_model_dir).parent)
    with pytest.raises(AdapterError, match="outside the allowed adapter roots"):
        inspect_adapter("x", link, config)
    other = tmp_path / "other-base"
    shutil.copytree(adapter_dir / "a", other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/other"}))
    with pytest.raises(AdapterError, match="differs from the server's"):
        inspect_adapter("x", other, config)
    strict = config.model_copy(update={"max_lora_rank": 1})
    with pytest.raises(AdapterError, match="max_lora_rank"):
        inspect_adapter("x", adapter_dir / "a", strict)
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="IA3"):
        inspect_adapter("x", other, config)


class ByteTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_tracker_holds_back_partial_stops_and_characters():
    tracker = TextTracker(ByteTokenizer(), stop=("END",))
    pieces = [tracker.push(b) for b in b"ab EN"]
    assert "".join(p for p, _ in pieces) == "ab "  # "EN" may start "END": held back
    assert tracker.push(ord("D")) == ("", "END")
    tracker = TextTracker(ByteTokenizer(), stop=("END",))
    for b in b"ab EN":
        tracker.push(b)
    assert tracker.push(ord("x")) == ("ENx", None)  # not a stop after all: released
    tracker = TextTracker(ByteTokenizer())
    first, _ = tracker.push("é".encode()[0])
    second, _ = tracker.push("é".encode()[1])
    assert (first, second) == ("", "é")  # half a UTF-8 character is never streamed


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(3, 50)
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_k=1)] * 2 + [
        SamplingParams(max_tokens=1, temperature=0.7, top_p=1e-6)
    ]
    chosen = choose_tokens(logits, params, [make_generator(i) for i in range(3)])
    assert chosen == logits.argmax(-1).tolist()


def test_registry_adapters_resolve_to_published_versions(tiny_model_dir, adapter_dir, tmp_path, references):
    """`lorafleet serve --storage URI --adapters NAME@ALIAS`: served under the registry name, from the version."""
    from lorafleet.errors import ConfigError
    from lorafleet.registry import publish_adapter
    from lorafleet.serving.config import with_registry_adapters

    storage = tmp_path / "storage"
    published = publish_adapter(str(storage), "pricing", adapter_dir / "a")
    config = with_registry_adapters(
        ServingConfig(base=tiny_model_dir, storage=str(storage), registry_adapters=["pricing@latest"], torch_threads=1)
    )
    assert config.adapters == {"pricing": str(published.path)}
    engine = CPUEngine(config)  # default roots: the storage root holds the registry
    engine.start()
    try:
        assert run(engine, PROMPTS[0], "pricing", GREEDY)[0] == references["a"][0]
    finally:
        engine.shutdown()
    with pytest.raises(ConfigError, match="pricing@prod"):
        with_registry_adapters(
            ServingConfig(base=tiny_model_dir, storage=str(storage), registry_adapters=["pricing@prod"])
        )


# ---- mixed LoRA in one pass per layer (serving/lora_stack.py) ------------------------------------------------


def test_stacked_lora_matches_peft_mixed_forward(tiny_model_dir, tmp_path):
    """3 adapters of ranks 4, 8, 16 (two target q/v, one every linear layer) + base rows: same logits as PEFT."""
    from transformers import AutoModelForCausalLM

    from lorafleet.serving.adapter_store import BASE, MIXED, AdapterStore

    made = {
        "r4": make_adapter(tiny_model_dir, tmp_path / "r4", "lora", seed=11, rank=4),
        "r8all": make_adapter(tiny_model_dir, tmp_path / "r8all", "lora-all", seed=12, rank=8),
        "r16": make_adapter(tiny_model_dir, tmp_path / "r16", "lora", seed=13, rank=16),
    }
    config = ServingConfig(base=tiny_model_dir, adapter_roots=[str(tmp_path)])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    store = AdapterStore(config, model, torch.float32)
    loaded = {name: store.load(inspect_adapter(name, path, config), replace=False) for name, path in made.items()}
    rows = [loaded["r4"], None, loaded["r8all"], loaded["r16"], loaded["r4"], None, loaded["r16"]]
    ids = torch.randint(0, model.config.vocab_size, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with store.routing(MIXED, rows):
            stacked = model(input_ids=ids).logits
        layers = store._stack.layers
        assert len(layers) == len(store._hooked) > 0
        assert not store._stack.fallback, "every LoRA layer of plain LoRA adapters is stacked"
        names = [adapter.internal if adapter is not None else BASE for adapter in rows]
        reference = store.peft(input_ids=ids, adapter_names=names).logits  # PEFT's own mixed-batch forward
        with store.peft.disable_adapter():
            base = store.peft(input_ids=ids).logits
    assert (stacked - reference).abs().max().item() < 1e-5
    for row, adapter in enumerate(rows):
        changed = (stacked[row] - base[row]).abs().max().item()
        assert (changed > 1e-3) if adapter is not None else (changed < 1e-6), (row, changed)
    assert all("forward" not in layer.module.__dict__ for layer in layers), "PEFT's forward is back after the pass"


def test_hot_reload_during_a_mixed_batch_serves_each_request_its_version(engine, adapter_dir, references):
    """`swap` moves from a to b while a long request on the old version decodes: both versions share a batch."""
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def main():
        await engine.load_adapter("swap", str(adapter_dir / "a"))
        ids = engine.tokenizer(PROMPTS[0]).input_ids
        old = engine.submit(GenerationRequest(ids, "swap", long), asyncio.get_running_loop())
        pieces = [(await anext(aiter(old))).text]
        await engine.load_adapter("swap", str(adapter_dir / "b"), replace=True)
        new = (await _generate(engine, PROMPTS[0], "swap", GREEDY))[0]
        old_running = engine.stats().running > 0
        async for delta in old:
            assert delta.error is None
            pieces.append(delta.text)
        await engine.unload_adapter("swap")
        same_as_a = (await _generate(engine, PROMPTS[0], "a", long))[0]
        return new, old_running, "".join(pieces), same_as_a

    new, old_running, old_text, same_as_a = asyncio.run(main())
    assert old_running, "the old-version request was still decoding when the new version answered"
    assert new == references["b"][0]
    assert old_text == same_as_a


def test_stacked_and_peft_paths_give_the_same_mixed_batch(engine, references):
    jobs = [(prompt, model, GREEDY) for model in ("a", "b", "tiny", "pt") for prompt in PROMPTS]
    expected = [references[model][j] for model in ("a", "b", "tiny", "pt") for j in range(len(PROMPTS))]
    engine.store.stack_lora = False
    try:
        peft_path = [text for text, _ in run_many(engine, jobs)]
    finally:
        engine.store.stack_lora = True
    stacked = [text for text, _ in run_many(engine, jobs)]
    assert stacked == peft_path == expected


# ---- one bad row never fails its batch -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_adapter(adapter_dir, tmp_path_factory) -> Path:
    """Adapter `a` with every weight NaN (a diverged run): it loads fine and cannot produce a token."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path_factory.mktemp("nan-adapter") / "nan"
    shutil.copytree(adapter_dir / "a", broken)
    weights = load_file(str(broken / "adapter_model.safetensors"))
    save_file(
        {key: tensor * float("nan") for key, tensor in weights.items()}, str(broken / "adapter_model.safetensors")
    )
    return broken


def test_nan_adapter_fails_alone_over_http(tiny_model_dir, adapter_dir, nan_adapter):
    """Concurrent requests (official client) for a NaN adapter and healthy ones: only the NaN ones get a 500."""
    import openai

    from lorafleet.serving.app import create_app
    from lorafleet.serving.server import ServerThread

    config = ServingConfig(
        base=tiny_model_dir,
        served_model_name="tiny",
        adapters={"a": str(adapter_dir / "a"), "b": str(adapter_dir / "b"), "nan": str(nan_adapter)},
        adapter_roots=[str(adapter_dir), str(nan_adapter.parent)],
        max_batch_size=32,
        max_wait_ms=200,  # the concurrent requests start as one batch
        torch_threads=1,
    )

    def body(model: str, prompt: str, temperature: float) -> dict:
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": NEW_TOKENS,
            "temperature": temperature,
            "seed": 7,
            "extra_body": {"ignore_eos": True},
        }

    healthy = [body(model, prompt, t) for model in ("a", "b", "tiny") for prompt in PROMPTS[:2] for t in (0, 1.0)]
    broken = [body("nan", prompt, t) for prompt in PROMPTS[:2] for t in (0, 1.0)]
    with ServerThread(create_app(config)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        alone = [client.completions.create(**request).choices[0].text for request in healthy]

        async def together():
            async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as aclient:
                calls = [aclient.completions.create(**request) for request in broken + healthy]
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(together())
        after = client.completions.create(**healthy[0]).choices[0].text
    failed, answered = results[: len(broken)], results[len(broken) :]
    assert [r.choices[0].text if not isinstance(r, Exception) else repr(r) for r in answered] == alone
    for error in failed:
        assert isinstance(error, openai.InternalServerError) and error.status_code == 500, repr(error)
        assert error.body["type"] == "InternalServerError"
        assert "adapter nan produced non-finite logits" in error.body["message"]
    assert after == alone[0]


def test_a_failing_step_is_retried_per_adapter(engine, references, monkeypatch):
    """A decode step that raises because of one adapter's rows: the other adapters' rows finish as usual."""
    real_routing = engine.store.routing
    calls = {"b": 0}

    def faulty_routing(cohort, adapters):
        if any(adapter is not None and adapter.name == "b" for adapter in adapters):
            calls["b"] += 1
            if calls["b"] >= 3:  # the prefill and a first decode step go through, then every pass with `b` fails
                raise RuntimeError("injected failure in a pass with adapter b")
        return real_routing(cohort, adapters)

    monkeypatch.setattr(engine.store, "routing", faulty_routing)

    async def main():
        jobs = [(prompt, model, GREEDY) for model in ("a", "b", "tiny", "pt") for prompt in PROMPTS]
        return await asyncio.gather(*(_generate(engine, *job) for job in jobs), return_exceptions=True)

    results = asyncio.run(main())
    monkeypatch.undo()
    by_model = {
        model: results[i * len(PROMPTS) : (i + 1) * len(PROMPTS)] for i, model in enumerate(("a", "b", "tiny", "pt"))
    }
    for model in ("a", "tiny", "pt"):
        assert [text for text, _ in by_model[model]] == references[model], model
    assert all(isinstance(error, RuntimeError) and "injected" in str(error) for error in by_model["b"])
    assert calls["b"] >= 3
    assert run(engine, PROMPTS[0], "b", GREEDY)[0] == references["b"][0]


@pytest.fixture(scope="module")
def nan_scaled(engine, adapter_dir):
    """Adapter `a` loaded as `nanscale`, then its scaling set to NaN in every layer: what a NaN or overflowing
    lora_alpha would do if it got past the load checks (they refuse it: test_hostile_serving)."""
    loaded = asyncio.run(engine.load_adapter("nanscale", str(adapter_dir / "a")))
    broken = 0
    for module in engine.model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and loaded.internal in scaling:
            scaling[loaded.internal] = float("nan")
            broken += 1
    assert broken > 0
    engine.store._stack = None  # stacks fold the scaling in: the next pass stacks the broken one afresh
    yield "nanscale"
    asyncio.run(engine.unload_adapter("nanscale"))


TINY_TEMPERATURE = SamplingParams(max_tokens=NEW_TOKENS, temperature=1e-300, ignore_eos=True, seed=3)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mix=st.lists(
        st.tuples(st.sampled_from(["a", "b", "tiny", "pt", "d", "nanscale"]), st.integers(0, len(PROMPTS) - 1),
                  st.sampled_from(["greedy", "tiny temperature"])),
        min_size=2, max_size=10,
    )
)  # fmt: skip
def test_a_broken_scaling_or_a_tiny_temperature_fails_only_its_own_requests(engine, references, nan_scaled, mix):
    """Any mix of rows: those of the NaN-scaled adapter fail alone (NonFiniteLogits), a temperature of 1e-300 is
    greedy (not a 500), and every other row answers exactly what it answers alone."""
    from lorafleet.serving.engine_api import NonFiniteLogits

    params = {"greedy": GREEDY, "tiny temperature": TINY_TEMPERATURE}
    jobs = [(PROMPTS[prompt], model, params[how]) for model, prompt, how in mix]

    async def main():
        return await asyncio.gather(*(_generate(engine, *job) for job in jobs), return_exceptions=True)

    for (model, prompt, _), result in zip(mix, asyncio.run(main()), strict=True):
        if model == nan_scaled:
            assert isinstance(result, NonFiniteLogits), result
        else:
            assert not isinstance(result, BaseException), result
            assert result[0] == references[model][prompt], (model, prompt)


# ---- the optimised path: packed base weights, growing KV cache, stacked LoRA ------------------------------------


def record_logits(engine: CPUEngine) -> tuple[dict, callable]:
    """Every row's logits at prefill and at each decode step, with its model, prompt and tokens (by sequence)."""
    seen: dict[int, tuple[str, list[int], list[torch.Tensor], list[int]]] = {}
    choose = engine.runner.choose

    def recording(logits, seqs):
        tokens = choose(logits, seqs)
        for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            entry = seen.setdefault(id(seq), (seq.request.model, list(seq.request.prompt_ids), [], []))
            entry[2].append(logits[row].float().clone())
            entry[3].append(token)
        return tokens

    engine.runner.choose = recording
    return seen, lambda: setattr(engine.runner, "choose", choose)


def compare_with_references(seen: dict, references: dict) -> tuple[float, float]:
    """(largest |engine - reference| logit, share of steps with the same top-1 token) over every recorded step;
    `references`: model name -> a model in eval mode (a PeftModel holding several adapters is switched to the one
    named like the model)."""
    worst, same, steps = 0.0, 0, 0
    with torch.inference_mode():
        for model, prompt, logits, tokens in seen.values():
            reference = references[model]
            if model in getattr(reference, "peft_config", {}):
                reference.set_adapter(model)
            for step, got in enumerate(logits):
                ids = torch.tensor([prompt + tokens[:step]])
                expected = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
                worst = max(worst, (got - expected).abs().max().item())
                same += int(got.argmax() == expected.argmax())
                steps += 1
    return worst, same / steps


def worst_logit_gap(seen: dict, references: dict) -> float:
    return compare_with_references(seen, references)[0]


def test_every_step_logits_equal_peft_for_a_mixed_batch_of_every_method(engine, tiny_model_dir, adapter_dir):
    """Prefill and each decode step of a batch mixing LoRA, all-linear LoRA, prompt, prefix and P-tuning rows with
    base rows (and DoRA in its own batch): each row's logits equal PEFT's full forward over its tokens (< 1e-4)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert type(engine.model.lm_head).__name__ == "PackedLinear", "the base runs on packed weights here"
    seen, restore = record_logits(engine)
    try:
        params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        models = ["a", "b", "pt", "px", "pe", "tiny", "d", "a", "tiny"]
        run_many(engine, [(PROMPTS[i % len(PROMPTS)], model, params, 0.02 * (i % 3)) for i, model in enumerate(models)])
    finally:
        restore()
    assert sorted(entry[0] for entry in seen.values()) == sorted(models)

    base = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # noqa: E731
    loras = PeftModel.from_pretrained(base(), adapter_dir / "a", "a")
    for name in ("b", "d"):
        loras.load_adapter(adapter_dir / name, name)
    references = {"tiny": base(), **{name: loras.eval() for name in ("a", "b", "d")}}
    references |= {name: PeftModel.from_pretrained(base(), adapter_dir / name).eval() for name in ("pt", "px", "pe")}
    assert worst_logit_gap(seen, references) < 1e-4


# ---- prefix caching ---------------------------------------------------------------------------------------------

PREAMBLE = "You are a careful assistant for a shop. Answer in one short sentence, and never invent prices. " * 2


def test_prefix_cache_hits_stay_within_one_adapter_version(tiny_model_dir, tmp_path):
    """Prompts sharing a long preamble: later ones reuse the KV of their own adapter's load only. Another adapter,
    the base, or a new version loaded under the same name never hits it; every logit equals PEFT's (< 1e-4)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folders = {
        "a": make_adapter(tiny_model_dir, tmp_path / "a", "lora", seed=1),
        "b": make_adapter(tiny_model_dir, tmp_path / "b", "lora-all", seed=2),
        "a-v2": make_adapter(tiny_model_dir, tmp_path / "a-v2", "lora", seed=3),
    }
    config = ServingConfig(
        base=tiny_model_dir,
        served_model_name="tiny",
        adapters={"a": str(folders["a"]), "b": str(folders["b"])},
        adapter_roots=[str(tmp_path)],
        torch_threads=1,
    )
    engine = CPUEngine(config)
    engine.start()
    base = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # noqa: E731
    references = {"tiny": base(), **{name: PeftModel.from_pretrained(base(), folders[name]).eval() for name in "ab"}}
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    stats = engine.runner.prefixes.stats
    assert len(engine.tokenizer(PREAMBLE).input_ids) >= 2 * engine.runner.prefixes.block_tokens

    def round_of(models: list[str], tail: str) -> tuple[int, float]:
        """(prompt tokens served from the cache in this round, the worst logit gap to PEFT)."""
        hits = stats.hit_tokens
        seen, restore = record_logits(engine)
        try:
            run_many(engine, [(PREAMBLE + tail, model, params) for model in models])
        finally:
            restore()
        return stats.hit_tokens - hits, worst_logit_gap(seen, references)

    try:
        assert round_of(["a"], "What is a kettle?") == (0, pytest.approx(0, abs=1e-4))
        hits, gap = round_of(["b", "tiny"], "What is a kettle?")  # same tokens, other owners: no hit
        assert hits == 0 and gap < 1e-4
        hits, gap = round_of(["a", "b", "tiny"], "And a toaster?")  # each reuses its own preamble
        assert hits >= 3 * engine.runner.prefixes.block_tokens and gap < 1e-4

        asyncio.run(engine.load_adapter("a", str(folders["a-v2"]), replace=True))  # a new version, same name
        references["a"] = PeftModel.from_pretrained(base(), folders["a-v2"]).eval()
        hits, gap = round_of(["a"], "And a toaster?")
        assert hits == 0, "a new version never reads the KV of the version before"
        assert gap < 1e-4
        hits, gap = round_of(["a"], "And a lamp?")
        assert hits > 0 and gap < 1e-4
    finally:
        engine.shutdown()
