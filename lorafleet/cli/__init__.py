"""The `lorafleet` command: one module per subcommand group, assembled here.

lorafleet validate configs/tiny.yaml
lorafleet train configs/demo.yaml
lorafleet data check data.jsonl --format alpaca
lorafleet models pull builtin:smollm2-135m-instruct
lorafleet quantize RUN --method gptq-w4a16 --out DIR
lorafleet export RUN --format gguf --out price.gguf
"""

from __future__ import annotations

import sys

import typer

from lorafleet.cli import (
    batch,
    data,
    demo,
    evaluate,
    export,
    jobs,
    merge,
    models,
    quantize,
    registry,
    render,
    serve,
    submit,
    sweep,
    sync,
    train,
    validate,
)
from lorafleet.errors import LorafleetError, describe_os_error

app = typer.Typer(
    name="lorafleet",
    help="Fine-tune LLMs with LoRA/QLoRA on Ray and serve the adapters (vLLM multi-LoRA or the CPU engine).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("validate")(validate.validate)
app.command("demo")(demo.demo)
app.command("train")(train.train)
app.command("sweep")(sweep.sweep)
app.command("eval")(evaluate.evaluate)
app.command("merge")(merge.merge)
app.command("quantize")(quantize.quantize)
app.command("export")(export.export)
app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")
app.add_typer(registry.app, name="registry")
app.command("publish")(registry.publish)
app.command("promote")(registry.promote)
app.command("rollback")(registry.rollback)
app.command("compose")(registry.compose)
app.command("submit")(submit.submit)
app.add_typer(jobs.app, name="jobs")
app.add_typer(render.app, name="render")
app.command("serve")(serve.serve)
app.command("sync")(sync.sync)
app.command("batch")(batch.batch)


def main() -> None:
    """Console entry point: user mistakes print a clear message and an exit code, not a traceback.

    Typer's standalone mode already turns usage errors into exit 2 and `typer.Exit(n)` into exit n;
    our own errors carry their exit code.
    """
    quiet_libraries()
    try:
        app()
    except LorafleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # storage read-only, a full disk, no permission: the OS's words, not a traceback
        typer.echo(f"error: {describe_os_error(exc)}", err=True)
        sys.exit(1)


def quiet_libraries() -> None:
    """Keep the console to lorafleet's own lines: the libraries' deprecation notices (FutureWarning),
    bitsandbytes' note that an optional CPU kernel package is absent (logged at import, by every command),
    DeepSpeed's notices and transformers' per-load "Loading weights" bars are not the user's concern. Errors
    still show."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub, and so transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl|accelerate|torch)(\.|$)")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # DeepSpeed sets its logger's level when imported (by merges, through PEFT) and notes "Setting accelerator to
    # CPU" at once; a filter outlasts that setLevel
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
