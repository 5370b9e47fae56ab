"""`lorafleet render rayjob|raycluster CONFIG`: print the KubeRay object for a job config.

    lorafleet render rayjob configs/tiny.yaml --run-id tiny-1 | kubectl apply -f -
    lorafleet render rayjob configs/my-job.yaml --image registry/lorafleet:0.1.0 --pvc shared --cluster lorafleet
    lorafleet render raycluster configs/my-job.yaml --namespace ml

Cluster options (image, namespace, PVC, selectors, ...) come from flags, over `--k8s-options FILE.yaml`
(a mapping of `lorafleet.cluster_options.ClusterOptions` fields), over the defaults there; the flags are declared
once, in `lorafleet.cli.cluster_flags`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli import options
from lorafleet.cli.cluster_flags import ClusterFlags, with_cluster_flags

app = typer.Typer(help="Print KubeRay objects (RayJob, RayCluster) for a job config.", no_args_is_help=True)

RunIdOption = typer.Option(None, "--run-id", help="Name the run (default: <job name>-<UTC time>).")
RuntimeEnvOption = typer.Option(None, "--runtime-env", help="Ray runtime env to merge in: a YAML/JSON file or JSON.")


def rayjob_text(job, run_id: str, cluster) -> str:
    """What `render rayjob` prints (and `submit --k8s --dry-run`): a comment line, then the RayJob YAML."""
    from lorafleet.kuberay import render_rayjob, to_yaml

    body = render_rayjob(job, run_id, cluster)
    return to_yaml(body, f"RayJob for run {run_id} (job {job.name}): kubectl apply -f - , or: lorafleet submit --k8s")


@app.command("rayjob")
@with_cluster_flags(rayjob=True)
def rayjob(
    config: Path = options.ConfigArg,
    overrides: list[str] = options.SetOption,
    run_id: str = RunIdOption,
    runtime_env: str = RuntimeEnvOption,
    *,
    cluster: ClusterFlags,
) -> None:
    """Print a ray.io/v1 RayJob that runs `lorafleet train` on its own cluster (or on --cluster)."""
    from lorafleet.jobs import submission_run_id

    job = options.load(config, overrides)
    typer.echo(rayjob_text(job, submission_run_id(job, run_id), cluster.options(runtime_env)), nl=False)


@app.command("raycluster")
@with_cluster_flags(rayjob=False)
def raycluster(
    config: Path = options.ConfigArg,
    overrides: list[str] = options.SetOption,
    *,
    cluster: ClusterFlags,
) -> None:
    """Print a ray.io/v1 RayCluster sized for the job (then `lorafleet submit --address` or `--cluster`)."""
    from lorafleet.kuberay import render_raycluster, to_yaml

    job = options.load(config, overrides)
    body = render_raycluster(job, cluster.options())
    typer.echo(to_yaml(body, f"RayCluster for job {job.name}: kubectl apply -f -"), nl=False)
