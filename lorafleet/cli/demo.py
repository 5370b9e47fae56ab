"""`lorafleet demo`: the whole loop on the embedded default, each step a real lorafleet command.

    make demo        (or: lorafleet demo)

data → train two adapters (price, support) on 2 Ray workers → evaluate each against the base → publish
to the registry → serve both on one base (CPU engine) → ask each a question through the official
`openai` client → stop the server. Every step prints the command it runs, so it can be replayed by hand.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import typer

from lorafleet.config import load_job_config
from lorafleet.demo_tasks import price
from lorafleet.errors import LorafleetError
from lorafleet.paths import default_storage_uri, shipped_configs_dir
from lorafleet.runs import is_finished
from lorafleet.serving.server import free_port

PRICE_QUESTION = "Lumora's large standing desk made of solid oak. It offers a built-in cable tray and a motorized lift."
DEMO_JOBS = (("price", "demo.yaml"), ("support", "demo-support.yaml"))


class Question(NamedTuple):
    chat: str  # asked through chat completions, for adapters trained on alpaca or chat rows
    completion: str | None = None  # asked through completions, for adapters trained on completion rows
    numeric: bool = False  # also asked for n samples, aggregated as eval aggregates them


QUESTIONS = {
    "price": Question(
        chat=f"{price.INSTRUCTION}\n\n{PRICE_QUESTION}",
        completion=f"{PRICE_QUESTION}\n{price.COMPLETION_CUE}",
        numeric=True,
    ),
    "support": Question(
        "Classify this support ticket and write a one-sentence reply.\n\n"
        "Hi, I was charged twice for order #482913 this morning. Please fix this."
    ),
}


def demo(
    storage: str = typer.Option(None, "--storage", help="Storage root for runs and the registry (default: cache)."),
    configs: Path = typer.Option(
        shipped_configs_dir(), "--configs", help="Folder with demo.yaml and demo-support.yaml."
    ),
    port: int = typer.Option(0, "--port", help="Port for the demo server (0: any free port)."),
    eval_examples: int = typer.Option(
        None, "--eval-examples", help="Test examples per evaluation (default: the config's eval.max_examples)."
    ),
) -> None:
    """Train, evaluate, publish and serve the two demo adapters, then ask each a question."""
    storage = storage or default_storage_uri()
    run_ids: dict[str, str] = {}
    formats = {name: load_job_config(configs / config_file).data.format for name, config_file in DEMO_JOBS}
    for name, config_file in DEMO_JOBS:
        run_ids[name] = run_id = f"demo-{name}"
        if is_finished(Path(storage) / "runs" / run_id):
            typer.echo(f"\n{run_id} is already trained in {storage}: reusing it")
            continue
        # An unfinished run with this id resumes from its last checkpoint.
        _step("lorafleet", "train", str(configs / config_file), "--set", f"storage.uri={storage}", "--run-id", run_id)
    for name, run_id in run_ids.items():
        limit = ("--max-examples", str(eval_examples)) if eval_examples else ()
        _step("lorafleet", "eval", run_id, "--storage", storage, *limit)
        _step("lorafleet", "publish", run_id, "--name", name, "--storage", storage)
    port = port or free_port()
    server = _start_server(storage, ",".join(run_ids), port)
    try:
        _ask_each_adapter(port, formats)
    finally:
        server.terminate()
        server.wait(timeout=60)
    typer.echo("\nreports:")
    for run_id in run_ids.values():
        typer.echo(f"  {storage}/runs/{run_id}/report/eval.md (plots beside it)")


def _step(*command: str) -> None:
    typer.secho(f"\n$ {shlex.join(command)}", bold=True)
    result = subprocess.run([sys.executable, "-m", "lorafleet", *command[1:]], check=False)
    if result.returncode != 0:
        raise LorafleetError(f"demo step failed (exit {result.returncode}): {shlex.join(command)}")


def _start_server(storage: str, adapters: str, port: int) -> subprocess.Popen:
    command = ["lorafleet", "serve", "--engine", "cpu", "--storage", storage, "--adapters", adapters]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--max-batch-size", str(SAMPLES)]
    typer.secho(f"\n$ {shlex.join(command)} &", bold=True)
    server = subprocess.Popen([sys.executable, "-m", "lorafleet", *command[1:]], env=os.environ.copy())
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise LorafleetError(f"the demo server exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.terminate()
    raise LorafleetError("the demo server did not become healthy within 300 s")


def _ask_each_adapter(port: int, formats: dict[str, str]) -> None:
    """Each adapter and the base get the demo's question, through the API that matches the adapter's data format."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    listed = client.models.list().data
    typer.echo(f"\nserved models: {', '.join(model.id for model in listed)}")
    base = next(model.id for model in listed if not (model.model_extra or {}).get("parent"))  # adapters have one
    for adapter, data_format in formats.items():
        question = QUESTIONS[adapter]
        as_completion = data_format == "completion" and question.completion is not None
        prompt = question.completion if as_completion else question.chat
        api = "completions" if as_completion else "chat completions"
        typer.secho(f"\n[{adapter}] ({api}) {prompt}", fg="cyan")
        for model in (adapter, base):
            if as_completion:
                reply = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stop=["\n"])
                answer = reply.choices[0].text
            else:
                messages = [{"role": "user", "content": prompt}]
                reply = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0)
                answer = reply.choices[0].message.content
            label = "fine-tuned" if model == adapter else "base model"
            typer.echo(f"→ {label}: {answer.strip()}")
            if question.numeric and model == adapter and as_completion:
                _ask_for_samples(client, model, prompt)


SAMPLES = 16


def _ask_for_samples(client, model: str, prompt: str) -> None:
    """n sampled answers in one request (one prefill), read as one number the way eval reads them."""
    from lorafleet.training.evaluate_sampling import aggregate_answers

    reply = client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=1.0, seed=0, n=SAMPLES, stop=["\n"]
    )
    answers = [choice.text.strip() for choice in reply.choices]
    estimate = aggregate_answers(answers, "geometric_mean") or "no number"
    shown = ", ".join(answers[:6])
    typer.echo(f"→ fine-tuned, {SAMPLES} samples ({shown}, ...): geometric mean ${estimate}")

