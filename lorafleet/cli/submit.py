"""`lorafleet submit CONFIG`: run a fine-tune on a remote Ray cluster (Ray Jobs API) or as a KubeRay RayJob.

    lorafleet submit configs/tiny.yaml --address http://ray-head:8265 --set storage.uri=/mnt/shared --wait
    lorafleet submit configs/my-job.yaml --k8s --dry-run            # exactly what `render rayjob` prints
    lorafleet submit configs/my-job.yaml --k8s --context prod --wait
    lorafleet submit configs/sweep-tiny.yaml --sweep --address http://ray-head:8265   # `lorafleet sweep` there

A config with a sweep: section runs as a sweep (`--sweep` says so and refuses a config without one); the
run id is then the sweep id.

The run id is fixed here, so a resubmission with the same `--run-id` resumes the same run folder.
With `--wait`, the exit code is 0 when the job succeeded and 1 when it failed or was stopped.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli import options, render
from lorafleet.cli.cluster_flags import ClusterFlags, with_cluster_flags
from lorafleet.errors import LorafleetError
from lorafleet.storage import is_local_uri

AddressOption = typer.Option(
    None, "--address", envvar="RAY_API_SERVER_ADDRESS", help="Ray dashboard URL, e.g. http://ray-head:8265."
)


@with_cluster_flags(rayjob=True)
def submit(
    config: Path = options.ConfigArg,
    overrides: list[str] = options.SetOption,
    address: str = AddressOption,
    wait: bool = typer.Option(
        False, "--wait", help="Stream logs / status until the job ends; exit 1 unless it succeeded."
    ),
    runtime_env: str = render.RuntimeEnvOption,
    run_id: str = render.RunIdOption,
    k8s: bool = typer.Option(False, "--k8s", help="Create a KubeRay RayJob instead of using the Ray Jobs API."),
    sweep: bool = typer.Option(
        False, "--sweep", help="Run the config's sweep: section with `lorafleet sweep` on the cluster."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --k8s: print the RayJob, create nothing."),
    context: str = typer.Option(None, "--context", help="kubeconfig context (default: the current one)."),
    kubeconfig: str = typer.Option(
        None, "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)."
    ),
    poll_seconds: float = typer.Option(5.0, "--poll-seconds", hidden=True, help="Status poll interval (--wait)."),
    *,
    cluster: ClusterFlags,
) -> None:
    """Submit a fine-tune to a Ray cluster; prints the job id and the run id."""
    from lorafleet.jobs import submission_run_id

    job = options.load(config, overrides)
    if sweep and job.sweep is None:
        raise LorafleetError(f"--sweep: {config} has no sweep: section (see docs/sweeps.md)")
    run_id = submission_run_id(job, run_id)
    if not k8s:
        if dry_run:
            raise LorafleetError("--dry-run needs --k8s (it prints the RayJob)")
        _submit_ray(job, run_id, address, runtime_env, wait, poll_seconds)
        return
    cluster_opts = cluster.options(runtime_env)
    if dry_run:
        typer.echo(render.rayjob_text(job, run_id, cluster_opts), nl=False)
        return
    _submit_k8s(job, run_id, cluster_opts, context, kubeconfig, wait, poll_seconds)


def _submit_ray(
    job, run_id: str, address: str | None, runtime_env: str | None, wait: bool, poll_seconds: float
) -> None:
    from lorafleet.jobs import RayJobs, read_runtime_env
    from lorafleet.paths import default_storage_uri

    jobs = RayJobs(address)
    submission = jobs.submit(job, run_id, read_runtime_env(runtime_env))
    typer.echo(f"job {submission.job_id}\nrun {submission.run_id}")
    if job.storage.uri == str(Path(default_storage_uri()).expanduser().resolve()):
        typer.echo(
            f"warning: storage.uri is this machine's default ({job.storage.uri}); the cluster will write there on "
            "its own disks. Set storage.uri to shared storage (an NFS/PVC path every node mounts, or s3://...)",
            err=True,
        )
    elif is_local_uri(job.storage.uri):
        typer.echo(f"storage {job.storage.uri} (every node of the cluster must see this path)")
    if not wait:
        typer.echo(f"follow: lorafleet jobs logs {submission.job_id} --follow --address {address}")
        return
    status = jobs.follow(submission.job_id, poll_s=min(poll_seconds, 1.0))
    typer.echo(f"job {submission.job_id} {status}")
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


def _submit_k8s(
    job, run_id: str, cluster_opts, context: str | None, kubeconfig: str | None, wait: bool, poll_seconds: float
) -> None:
    from lorafleet.jobs import KubeRayJobs, rayjob_succeeded
    from lorafleet.kuberay import render_rayjob

    body = render_rayjob(job, run_id, cluster_opts)
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    kube = KubeRayJobs(context=context, kubeconfig=kubeconfig)
    kube.create(body)
    typer.echo(f"rayjob {namespace}/{name} created\nrun {run_id}")
    hint = f"logs: kubectl logs -n {namespace} -f job/{name}  (the submitter's copy of the Ray job's logs)"
    if not wait:
        typer.echo(f"status: kubectl get rayjob -n {namespace} {name}\n{hint}")
        return
    typer.echo(hint)
    status = kube.follow(namespace, name, poll_s=poll_seconds)
    raise typer.Exit(0 if rayjob_succeeded(status) else 1)
