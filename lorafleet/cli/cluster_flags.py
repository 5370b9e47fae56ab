"""The KubeRay cluster flags, declared once: `render rayjob`, `render raycluster` and `submit --k8s` take them.

Each flag names the `lorafleet.cluster_options.ClusterOptions` field it sets and takes its help from that field's
description. `@with_cluster_flags(...)` adds the flags to a command and hands it one `ClusterFlags` holding their
values; `ClusterFlags.options(runtime_env)` builds the typed ClusterOptions: defaults < `--k8s-options FILE` < flags.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from lorafleet.errors import ConfigError, Problem


@dataclass(frozen=True)
class Flag:
    name: str  # the command-line flag
    field: str  # the ClusterOptions field it sets
    kind: Any  # its Python type as typer reads it
    rayjob_only: bool = False  # a RayJob setting (a RayCluster has no job to retry, time out or select for)
    help: str | None = None  # default: the field's description
    short: str | None = None


FLAGS = (
    Flag("--image", "image", str),
    Flag("--namespace", "namespace", str, short="-n"),
    Flag("--pvc", "pvc", str),
    Flag("--no-pvc", "no_pvc", bool, help="Mount no claim (storage.uri is an object store)."),
    Flag("--mount-path", "mount_path", str),
    Flag("--cluster", "cluster", str, rayjob_only=True),
    Flag("--name", "name", str),
    Flag("--node-selector", "node_selector", list[str], help="key=value for every pod. Repeatable."),
    Flag("--gpu-node-selector", "gpu_node_selector", list[str], help="key=value for GPU worker pods. Repeatable."),
    Flag(
        "--toleration",
        "gpu_tolerations",
        list[str],
        help="key[=value][:Effect] for GPU workers; replaces the nvidia.com/gpu default. Repeatable.",
    ),
    Flag("--service-account", "service_account", str),
    Flag("--worker-memory", "worker_memory", str),
    Flag("--ttl", "ttl_seconds_after_finished", int, rayjob_only=True),
    Flag("--active-deadline", "active_deadline_seconds", int, rayjob_only=True),
    Flag("--backoff-limit", "backoff_limit", int, rayjob_only=True),
    Flag("--submission-mode", "submission_mode", str, rayjob_only=True),
)
K8S_OPTIONS_HELP = "YAML file of cluster options (flags win)."


def _help(flag: Flag) -> str:
    from lorafleet.cluster_options import ClusterOptions

    if flag.help:
        return flag.help
    field = ClusterOptions.model_fields[flag.field]
    default = field.get_default(call_default_factory=True)
    shown = f" (default: {default})" if default not in (None, [], {}) else ""
    return f"{field.description}{shown}"


@dataclass(frozen=True)
class ClusterFlags:
    """The cluster flags as given on the command line (None: not given)."""

    values: dict[str, Any]
    k8s_options: Path | None = None

    def options(self, runtime_env: str | None = None):
        """The ClusterOptions these flags describe (defaults < --k8s-options file < flags)."""
        from lorafleet.cluster_options import Toleration, load_cluster_options
        from lorafleet.jobs import read_runtime_env
        from lorafleet.kuberay import merge_runtime_env

        values = _read_options_file(self.k8s_options)
        flags = dict(self.values)
        if flags.pop("no_pvc", False):
            values["pvc"] = None
        flags["node_selector"] = _pairs(flags.get("node_selector"), "--node-selector")
        flags["gpu_node_selector"] = _pairs(flags.get("gpu_node_selector"), "--gpu-node-selector")
        if flags.get("gpu_tolerations"):
            try:
                flags["gpu_tolerations"] = [Toleration.parse(t).model_dump() for t in flags["gpu_tolerations"]]
            except ValueError as exc:
                raise ConfigError("--toleration", [Problem("--toleration", str(exc))]) from None
        values |= {key: value for key, value in flags.items() if value is not None and value != []}
        if runtime_env:
            values["runtime_env"] = merge_runtime_env(values.get("runtime_env") or {}, read_runtime_env(runtime_env))
        return load_cluster_options(values, str(self.k8s_options) if self.k8s_options else "cluster options")


def with_cluster_flags(*, rayjob: bool) -> Callable:
    """Add the cluster flags (those of a RayJob, or of a RayCluster) to a command taking `cluster: ClusterFlags`."""
    flags = [flag for flag in FLAGS if rayjob or not flag.rayjob_only]

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
        own = [p for p in own if p.name != "cluster"]
        added = [
            inspect.Parameter(
                flag.field,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=flag.kind,
                default=typer.Option(
                    False if flag.kind is bool else None, *filter(None, (flag.name, flag.short)), help=_help(flag)
                ),
            )
            for flag in flags
        ]
        added.append(
            inspect.Parameter(
                "k8s_options",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Path,
                default=typer.Option(None, "--k8s-options", help=K8S_OPTIONS_HELP),
            )
        )

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            values = {flag.field: kwargs.pop(flag.field) for flag in flags}
            cluster = ClusterFlags(values=values, k8s_options=kwargs.pop("k8s_options"))
            return command(*args, cluster=cluster, **kwargs)

        run.__signature__ = signature.replace(parameters=[*own, *added])
        run.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
        return run

    return decorate


def _read_options_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    from lorafleet.yamlsource import YamlSource

    values = YamlSource.read(path).data  # its own errors: file not found, invalid YAML, alias bombs
    if not isinstance(values, dict):
        raise ConfigError(str(path), [Problem(str(path), "expected a mapping of cluster options")])
    return values


def _pairs(items: list[str] | None, flag: str) -> dict[str, str] | None:
    if not items:
        return None
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(flag, [Problem(f"{flag} {item}", "expected key=value")])
        pairs[key] = value
    return pairs
