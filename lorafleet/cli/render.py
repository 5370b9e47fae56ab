"""`lorafleet render rayjob|raycluster CONFIG`: print the KubeRay object for a job config.

    lorafleet render rayjob configs/tiny.yaml --run-id tiny-1 | kubectl apply -f -
    lorafleet render rayjob configs/my-job.yaml --image registry/lorafleet:0.1.0 --pvc shared --cluster lorafleet
    lorafleet render raycluster configs/my-job.yaml --namespace ml

Cluster options (image, namespace, PVC, selectors, ...) come from flags, over `--k8s-options FILE.yaml`
(a mapping of `lorafleet.kuberay.ClusterOptions` fields), over the defaults there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

from lorafleet.cli import options
from lorafleet.errors import ConfigError, Problem

app = typer.Typer(help="Print KubeRay objects (RayJob, RayCluster) for a job config.", no_args_is_help=True)

RunIdOption = typer.Option(None, "--run-id", help="Name the run (default: <job name>-<UTC time>).")
ImageOption = typer.Option(None, "--image", help="Image of every Ray pod (must have lorafleet installed).")
NamespaceOption = typer.Option(None, "--namespace", "-n", help="Namespace (default: lorafleet).")
PvcOption = typer.Option(None, "--pvc", help="ReadWriteMany claim for shared storage (default: lorafleet-storage).")
NoPvcOption = typer.Option(False, "--no-pvc", help="Mount no claim (storage.uri is an object store).")
MountPathOption = typer.Option(None, "--mount-path", help="Where the claim is mounted (default: /mnt/lorafleet).")
ClusterOption = typer.Option(None, "--cluster", help="Run on this existing RayCluster (clusterSelector).")
NameOption = typer.Option(None, "--name", help="Object name (default: from the run id / job name).")
NodeSelectorOption = typer.Option(None, "--node-selector", help="key=value for every pod. Repeatable.")
GpuNodeSelectorOption = typer.Option(None, "--gpu-node-selector", help="key=value for GPU worker pods. Repeatable.")
TolerationOption = typer.Option(
    None, "--toleration", help="key[=value][:Effect] for GPU workers; replaces the nvidia.com/gpu default. Repeatable."
)
ServiceAccountOption = typer.Option(None, "--service-account", help="Service account of the Ray pods.")
WorkerMemoryOption = typer.Option(None, "--worker-memory", help="Worker pod memory, e.g. 64Gi (default: 4Gi/CPU).")
TtlOption = typer.Option(None, "--ttl", help="Seconds to keep the cluster after the job ends (default 3600).")
DeadlineOption = typer.Option(None, "--active-deadline", help="Fail the RayJob after this many seconds.")
BackoffOption = typer.Option(None, "--backoff-limit", help="Retries, each on a new cluster (default 0).")
SubmissionModeOption = typer.Option(
    None, "--submission-mode", help="K8sJobMode (default), HTTPMode, InteractiveMode or SidecarMode."
)
RuntimeEnvOption = typer.Option(None, "--runtime-env", help="Ray runtime env to merge in: a YAML/JSON file or JSON.")
K8sOptionsFile = typer.Option(None, "--k8s-options", help="YAML file of cluster options (flags win).")


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


def cluster_options(k8s_options: Path | None = None, runtime_env: str | None = None, **flags: Any):
    """ClusterOptions from defaults < `--k8s-options` file < flags (None = not given)."""
    from lorafleet.jobs import read_runtime_env
    from lorafleet.kuberay import Toleration, load_cluster_options, merge_runtime_env

    values: dict[str, Any] = {}
    if k8s_options is not None:
        if not k8s_options.is_file():
            raise ConfigError(str(k8s_options), [Problem(str(k8s_options), "file not found")])
        values = yaml.safe_load(k8s_options.read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise ConfigError(str(k8s_options), [Problem(str(k8s_options), "expected a mapping of cluster options")])
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
    return load_cluster_options(values, str(k8s_options) if k8s_options else "cluster options")


def rayjob_text(job, run_id: str, cluster) -> str:
    """What `render rayjob` prints (and `submit --k8s --dry-run`): a comment line, then the RayJob YAML."""
    from lorafleet.kuberay import render_rayjob, to_yaml

    body = render_rayjob(job, run_id, cluster)
    return to_yaml(body, f"RayJob for run {run_id} (job {job.name}): kubectl apply -f - , or: lorafleet submit --k8s")


@app.command("rayjob")
def rayjob(
    config: Path = options.ConfigArg,
    overrides: list[str] = options.SetOption,
    run_id: str = RunIdOption,
    image: str = ImageOption,
    namespace: str = NamespaceOption,
    pvc: str = PvcOption,
    no_pvc: bool = NoPvcOption,
    mount_path: str = MountPathOption,
    cluster: str = ClusterOption,
    name: str = NameOption,
    node_selector: list[str] = NodeSelectorOption,
    gpu_node_selector: list[str] = GpuNodeSelectorOption,
    toleration: list[str] = TolerationOption,
    service_account: str = ServiceAccountOption,
    worker_memory: str = WorkerMemoryOption,
    ttl: int = TtlOption,
    active_deadline: int = DeadlineOption,
    backoff_limit: int = BackoffOption,
    submission_mode: str = SubmissionModeOption,
    runtime_env: str = RuntimeEnvOption,
    k8s_options: Path = K8sOptionsFile,
) -> None:
    """Print a ray.io/v1 RayJob that runs `lorafleet train` on its own cluster (or on --cluster)."""
    from lorafleet.jobs import submission_run_id

    job = options.load(config, overrides)
    cluster_opts = cluster_options(
        k8s_options,
        runtime_env,
        image=image,
        namespace=namespace,
        pvc=pvc,
        no_pvc=no_pvc,
        mount_path=mount_path,
        cluster=cluster,
        name=name,
        node_selector=node_selector,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=toleration,
        service_account=service_account,
        worker_memory=worker_memory,
        ttl_seconds_after_finished=ttl,
        active_deadline_seconds=active_deadline,
        backoff_limit=backoff_limit,
        submission_mode=submission_mode,
    )
    typer.echo(rayjob_text(job, submission_run_id(job, run_id), cluster_opts), nl=False)


@app.command("raycluster")
def raycluster(
    config: Path = options.ConfigArg,
    overrides: list[str] = options.SetOption,
    image: str = ImageOption,
    namespace: str = NamespaceOption,
    pvc: str = PvcOption,
    no_pvc: bool = NoPvcOption,
    mount_path: str = MountPathOption,
    name: str = NameOption,
    node_selector: list[str] = NodeSelectorOption,
    gpu_node_selector: list[str] = GpuNodeSelectorOption,
    toleration: list[str] = TolerationOption,
    service_account: str = ServiceAccountOption,
    worker_memory: str = WorkerMemoryOption,
    k8s_options: Path = K8sOptionsFile,
) -> None:
    """Print a ray.io/v1 RayCluster sized for the job (then `lorafleet submit --address` or `--cluster`)."""
    from lorafleet.kuberay import render_raycluster, to_yaml

    job = options.load(config, overrides)
    cluster_opts = cluster_options(
        k8s_options,
        None,
        image=image,
        namespace=namespace,
        pvc=pvc,
        no_pvc=no_pvc,
        mount_path=mount_path,
        name=name,
        node_selector=node_selector,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=toleration,
        service_account=service_account,
        worker_memory=worker_memory,
    )
    body = render_raycluster(job, cluster_opts)
    typer.echo(to_yaml(body, f"RayCluster for job {job.name}: kubectl apply -f -"), nl=False)
