"""`lorafleet batch`: answer a JSONL file of OpenAI requests offline (in-process engine, a server, or Ray Data).

lorafleet batch requests.jsonl --out answers.jsonl --base builtin:tiny-llama --adapter a=runs/x/adapter --model a
lorafleet batch requests.jsonl --out answers.jsonl --server http://127.0.0.1:8000 --concurrency 16
lorafleet batch requests.jsonl --out answers.jsonl --ray auto --actors 4 --storage /mnt/x --adapters price@prod

Exit codes: 0 every row answered, 1 some rows failed (listed in OUTPUT.errors.jsonl), 2 bad arguments.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli.serve import AdapterOption, AdaptersOption, BaseOption, ConfigOption, StorageOption
from lorafleet.errors import ConfigError, Problem


def batch(
    input_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL of request bodies."),
    out: Path = typer.Option(..., "--out", dir_okay=False, help="JSONL of answers (appended to; reruns resume)."),
    model: str = typer.Option(None, "--model", help="Model (base id or adapter name) of rows that name none."),
    server: str = typer.Option(None, "--server", help="Send to this server (ours or vLLM) instead of in-process."),
    api_key: str = typer.Option(
        None, "--api-key", envvar="LORAFLEET_API_KEY", help="--server's bearer token (env LORAFLEET_API_KEY)."
    ),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Requests in flight (per engine)."),
    ray: str = typer.Option(None, "--ray", help="Run on Ray Data: an address, `auto` or `local`."),
    actors: int = typer.Option(1, "--actors", min=1, help="With --ray: actors, each with its own engine."),
    base: str = BaseOption,
    adapter: list[str] = AdapterOption,
    adapters: str = AdaptersOption,
    storage: str = StorageOption,
    config: Path = ConfigOption,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
) -> None:
    """Answer every row of INPUT_FILE; rows already in --out are skipped, failed rows go to OUT.errors.jsonl."""
    from lorafleet.cli.serve import model_overrides, serving_settings
    from lorafleet.serving.batch_inference import BatchFailed, run_batch
    from lorafleet.serving.batch_rows import BatchJob

    engine_flags = {"--base": base, "--adapter": adapter, "--adapters": adapters, "--config": config}
    if server:
        given = [flag for flag, value in engine_flags.items() if value]
        problems = [Problem(flag, "picks the in-process engine; --server uses the server's models") for flag in given]
        if ray:
            problems.append(Problem("--ray", "runs engines on Ray; it cannot be combined with --server"))
        if problems:
            raise ConfigError("command line", problems)
        settings = None
    else:
        settings = serving_settings(config, model_overrides(base, adapter, adapters, storage))
        if settings.engine != "cpu":
            raise ConfigError(
                str(config or "command line"),
                [Problem("engine", "batch runs the CPU engine in-process; for vLLM start the server and use --server")],
            )
    job = BatchJob(
        input=input_file,
        output=out,
        model=model,
        server=server,
        api_key=api_key,
        concurrency=concurrency,
        ray=ray,
        actors=actors,
        settings=settings,
        progress=progress,
    )
    summary = run_batch(job)
    typer.echo(summary.line(), err=True)
    if summary.failed:
        raise BatchFailed(f"{summary.failed} row(s) failed: see {summary.errors_path}")
