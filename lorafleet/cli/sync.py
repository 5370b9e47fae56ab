"""`lorafleet sync`: keep the adapters loaded on running servers equal to what the registry says.

lorafleet sync --storage /mnt/lorafleet --target http://127.0.0.1:8000 --adapters a,b@prod --interval 30s
lorafleet sync --target http://replica-1:8000 --target http://replica-2:8000 --once     # one pass, exit 1 if not done

Exit codes (--once): 0 converged, 1 some target, load, probe or reference failed (each listed), 2 bad arguments.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import typer

from lorafleet.errors import ConfigError, Problem
from lorafleet.yamlsource import validation_problems


def sync(
    storage: str = typer.Option(
        None, "--storage", help="Storage root holding the registry. Default: $LORAFLEET_STORAGE, else the cache."
    ),
    target: list[str] = typer.Option(..., "--target", help="Server base URL (http://HOST:PORT). Repeatable."),
    adapters: str = typer.Option(
        None, "--adapters", help="Comma-separated NAME (latest), NAME@ALIAS or NAME@vN; default: every published name."
    ),
    interval: str = typer.Option("30s", "--interval", help="Time between passes: 30s, 5m, 1m30s or seconds."),
    api_key: str = typer.Option(
        None, "--api-key", envvar="LORAFLEET_API_KEY", help="The servers' bearer token (env LORAFLEET_API_KEY)."
    ),
    once: bool = typer.Option(False, "--once", help="One pass, then exit: 0 if converged, 1 if not."),
    route_port: int = typer.Option(
        None,
        "--route-port",
        help="Serve the alias router on this port: clients ask it for NAME, the --target serves each version "
        "under a name of its own (NAME.vN-DIGEST), never reusing a name for other weights (vLLM).",
    ),
    route_host: str = typer.Option("127.0.0.1", "--route-host", help="Interface of the router (0.0.0.0 in a pod)."),
) -> None:
    """Load, switch and unload adapters on every --target so they serve what the registry's references name."""
    from lorafleet.cli.serve import split_list
    from lorafleet.serving.sync import Syncer, SyncFailed

    references = split_list(adapters) if adapters is not None else None
    config = _config(storage, target, references, interval, api_key, route=route_port is not None)
    _log_to_stderr()
    syncer = Syncer(config)
    router = _start_router(config, syncer, route_host, route_port) if route_port is not None else None
    try:
        if once:
            report = syncer.reconcile()
            if not report.converged:
                raise SyncFailed(
                    f"not converged, {len(report.errors)} problem(s):\n  - " + "\n  - ".join(report.errors)
                )
            typer.echo(f"converged: {len(report.changes)} change(s) on {len(config.targets)} target(s)", err=True)
            return
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        syncer.run(stop)
    finally:
        if router is not None:
            router.stop()
        syncer.close()


def _start_router(config, syncer, host: str, port: int):
    """The alias router in front of the one target, in a background thread (sync's loop keeps the main one)."""
    from lorafleet.serving.alias_router import create_router
    from lorafleet.serving.server import ServerThread

    try:
        router = ServerThread(create_router(config.targets[0], syncer.aliases), host, port).start()
    except OSError as exc:
        raise ConfigError("command line", [Problem("--route-port", f"cannot listen on {host}:{port}: {exc}")]) from None
    typer.echo(f"alias router on {router.url} -> {config.targets[0]}", err=True)
    return router


def _config(storage, targets, adapters, interval, api_key, *, route: bool):
    from pydantic import ValidationError

    from lorafleet.serving.sync_config import SyncConfig

    values = {"targets": targets, "adapters": adapters, "interval_s": interval, "api_key": api_key, "route": route}
    if storage:
        values["storage"] = storage
    try:
        return SyncConfig(**values)
    except ValidationError as exc:
        flags = {"targets": "--target", "adapters": "--adapters", "interval_s": "--interval", "storage": "--storage"}
        flags |= {"route": "--route-port", "": "--target"}
        problems = validation_problems(exc, where=lambda keys: flags.get(keys[0] if keys else "", "arguments"))
        raise ConfigError("command line", problems) from None


def _log_to_stderr() -> None:
    """One line per change on stderr; httpx's per-request INFO lines stay off."""
    logger = logging.getLogger("lorafleet.sync")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
