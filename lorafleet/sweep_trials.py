"""A sweep's trials as job configs: the base config with one trial's values set, validated like any config.

`sweep_problems` checks a `sweep:` section against the config it sits in before anything starts: every path
exists and takes every value its domain can give, and the metric is one that runs report while they train.
`lorafleet.config` calls it when it loads a config, so `job` is a JobConfig taken by its base type here, and a
trial is validated with the job's own class.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lorafleet.adapter_config import yaml_keys
from lorafleet.errors import ConfigError, Problem
from lorafleet.schema import Section
from lorafleet.yamlsource import YamlSource, apply_override, validation_message

TRAIN_METRICS = ("loss", "learning_rate", "grad_norm", "epoch")  # every logging_steps
EVAL_METRICS = ("eval_loss", "eval_perplexity", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def trial_job(job: Section, values: dict[str, Any]) -> Section:
    """The job of one trial: `job` without its sweep, with each `path: value` of `values` set.

    Unless the config sets `training.save_steps`, a trial checkpoints at every evaluation: the scheduler stops
    trials on what an evaluation reported, and the stopped trial keeps the adapter it was judged by.
    """
    data = base_data(job)
    for path, value in values.items():
        data = apply_override(data, path.split("."), value)
    training = data.get("training") or {}
    if training.get("save_steps") is None and training.get("eval_steps") is not None:
        data = apply_override(data, ["training", "save_steps"], training["eval_steps"])
    return type(job).model_validate(data)


def base_data(job: Section) -> dict[str, Any]:
    data = job.model_dump(mode="json")
    data.pop("sweep", None)
    return data


def reported_metrics(job: Section) -> tuple[str, ...]:
    """The metrics a run of `job` reports while it trains (what a sweep can rank and stop trials by)."""
    evaluates = job.training.eval_steps is not None and (job.data.eval is not None or job.data.val_split > 0)
    return TRAIN_METRICS + (EVAL_METRICS if evaluates else ())


def sweep_problems(job: Section, source: YamlSource | None = None) -> list[Problem]:
    """What is wrong with `job.sweep` (nothing when there is no sweep)."""
    sweep = job.sweep
    if sweep is None:
        return []

    def where(keys: list[str]) -> str:
        located = source.location_of(["sweep", *keys]) if source is not None else ""
        return f"{located} sweep.{'.'.join(keys)}".strip()

    problems = []
    space_key = "space" if source is None or ("sweep", "space") in source.lines else None
    for path, domain in sweep.space.items():
        keys = [space_key, path] if space_key else [path]
        for value in domain.probes():
            message = _refusal(job, path, value)
            if message is not None:
                problems.append(Problem(where(keys), message))
                break
    metrics = reported_metrics(job)
    if sweep.metric not in metrics:
        hint = " (eval_* metrics need training.eval_steps and eval data)" if sweep.metric.startswith("eval_") else ""
        problems.append(
            Problem(
                where(["metric"]),
                f"no run of this config reports {sweep.metric!r}{hint}; runs report: {', '.join(metrics)}",
            )
        )
    if sweep.scheduler is not None and sweep.scheduler.grace_period is None and job.training.eval_steps is None:
        problems.append(Problem(where(["scheduler", "grace_period"]), "set it, or set training.eval_steps"))
    return problems


def _refusal(job: Section, path: str, value: Any) -> str | None:
    """Why the config refuses `path: value` (None: it takes it)."""
    keys = path.split(".")
    if any(not key for key in keys):
        return f"bad config path {path!r}"
    if keys[0] == "sweep":
        return "a sweep cannot change its own section"
    try:
        trial_job(job, {path: value})
    except ValueError as exc:  # apply_override: a path through a value that is not a section
        if not isinstance(exc, ValidationError):
            return f"{value!r}: {exc}"
        errors = [(yaml_keys(e["loc"])[0], e) for e in exc.errors()]
        keys_found, first = next(((k, e) for k, e in errors if k[: len(keys)] == keys), errors[0])
        where = ".".join(keys_found)
        if first["type"] == "extra_forbidden":
            return f"no such config key {where}"
        return f"{value!r}: {where}: {validation_message(first)}"
    return None


def check_sweep(job: Section, source: YamlSource | None = None) -> Section:
    problems = sweep_problems(job, source)
    if problems:
        raise ConfigError(source.name if source else "sweep", problems)
    return job
