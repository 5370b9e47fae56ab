"""Render a job config as KubeRay objects: a `RayJob` (own cluster per run) or a `RayCluster`.

    lorafleet render rayjob configs/tiny.yaml --pvc lorafleet-storage        # print, then `kubectl apply -f -`
    lorafleet render raycluster configs/tiny.yaml                            # a long-lived cluster for the job
    lorafleet submit configs/tiny.yaml --k8s --wait                          # create the RayJob and follow it

The cluster image must have lorafleet installed (default `lorafleet:<version>`: a Ray 2.x image plus
`pip install lorafleet`); `--runtime-env` adds pip packages or env vars on top. Shared storage is a
ReadWriteMany PVC mounted at the same path in every pod (head included: the driver writes the run
folder); a local `storage.uri` is rewritten to that mount path, and local data/model paths must live
under the storage root (they are rewritten the same way). Object-store URIs (s3://...) pass through.

The resolved config travels inside the RayJob itself (base64 in the entrypoint), so the object is the
whole record of what ran. The entrypoint is wrapped in `bash -c '...'` because KubeRay splices it into
the submitter's shell command line (`ray job submit ... -- <entrypoint>`).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import re
import shlex
from typing import Any

import yaml

from lorafleet.cluster_options import GPU_RESOURCE, ClusterOptions
from lorafleet.config import JobConfig
from lorafleet.errors import ConfigError, Problem
from lorafleet.jobs import entrypoint_words
from lorafleet.storage import is_local_uri
from lorafleet.versions import RAY_VERSION

API_VERSION = "ray.io/v1"
GROUP, VERSION = "ray.io", "v1"
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
MAX_RAYJOB_NAME = 47  # KubeRay: RayCluster name limit (53) minus the 6 characters it appends
MAX_RAYCLUSTER_NAME = 53
CONFIG_DIR_IN_POD = "/tmp/lorafleet"
POD_STOP_MARGIN_S = 30  # beyond distributed.sigterm_grace_s: the checkpoint's upload, Ray's own shutdown


# The Helm chart's non-root pod and container security (uid 1000 is the lorafleet image's user). The root
# filesystem stays writable: Ray writes its session folders under /tmp/ray and the image's home.
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


# ---- names and labels -------------------------------------------------------------------------------


def k8s_name(text: str, limit: int) -> str:
    """A DNS-1035 label (what KubeRay wants for RayJob/RayCluster names) of at most `limit` characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"lf-{name}".rstrip("-")
    if len(name) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:6]
        name = f"{name[: limit - 7].rstrip('-')}-{digest}"
    return name


def label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def _labels(job: JobConfig, run_id: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "lorafleet",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/managed-by": "lorafleet",
        "lorafleet.io/job": label_value(job.name),
    }
    if run_id:
        labels["lorafleet.io/run-id"] = label_value(run_id)
    return labels


# ---- the job config as the cluster sees it ----------------------------------------------------------


def cluster_job_config(job: JobConfig, options: ClusterOptions) -> dict[str, Any]:
    """The job config with local paths moved onto the shared mount; problems if the cluster cannot see them."""
    data = job.model_dump(mode="json")
    problems: list[Problem] = []
    storage = job.storage.uri
    local_root = storage.removeprefix("file://").rstrip("/") if is_local_uri(storage) else None
    if local_root is not None:
        if options.pvc is None and options.cluster is None:
            problems.append(Problem("storage.uri", f"{storage} is a local path: give --pvc NAME or use s3://"))
        data["storage"]["uri"] = options.mount_path

    def move(field: str, value: str | None) -> str | None:
        if value is None or not value.startswith("/"):
            if value is not None and value.startswith(("./", "../", "~")):
                problems.append(Problem(field, f"{value}: relative local paths cannot be seen by the cluster"))
            return value
        if local_root is not None and (value == local_root or value.startswith(local_root + "/")):
            return options.mount_path + value[len(local_root) :]
        if value.startswith(options.mount_path + "/"):
            return value  # already a path on the mount
        problems.append(
            Problem(
                field,
                f"{value} is a local path the cluster cannot see: copy it under the storage root "
                f"({storage}) so it appears under {options.mount_path}, or use builtin:/a hub name",
            )
        )
        return value

    data["data"]["train"] = move("data.train", data["data"]["train"])
    data["data"]["eval"] = move("data.eval", data["data"]["eval"])
    data["model"]["name_or_path"] = move("model.name_or_path", data["model"]["name_or_path"])
    gpus = job.distributed.resources_per_worker.get("GPU", 0)
    if gpus != int(gpus):
        problems.append(Problem("distributed.resources_per_worker.GPU", f"{gpus}: Kubernetes schedules whole GPUs"))
    if problems:
        raise ConfigError(f"job {job.name!r} on Kubernetes", problems)
    return data


def entrypoint_for(job: JobConfig, config_yaml: str, run_id: str) -> str:
    """`bash -c '...'` that writes the config into the head pod and runs `lorafleet train` (or `sweep`) on it.

    The quoting survives KubeRay's submitter (bash parses it; `ray job submit` re-joins the words with
    shlex) and Ray's own `shell=True` run of the entrypoint.
    """
    encoded = base64.b64encode(config_yaml.encode()).decode()
    path = f"{CONFIG_DIR_IN_POD}/{run_id}.yaml"
    script = (
        f"mkdir -p {CONFIG_DIR_IN_POD} && printf %s {encoded} | base64 -d > {path} && "
        f"exec {shlex.join(entrypoint_words(job, path, run_id))}"
    )
    return f"bash -c '{script}'"


def merge_runtime_env(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` wins, except env_vars, which are merged key by key (extra's win)."""
    merged = {**base, **extra}
    if "env_vars" in base or "env_vars" in extra:
        merged["env_vars"] = {**base.get("env_vars", {}), **extra.get("env_vars", {})}
    return merged


def runtime_env_for(options: ClusterOptions, *, storage_on_mount: bool) -> dict[str, Any]:
    working_dir = str(options.runtime_env.get("working_dir", ""))
    if working_dir and "://" not in working_dir:
        raise ConfigError(
            "runtime env",
            [Problem("working_dir", f"{working_dir} is local: a RayJob needs a remote URI (s3://.../code.zip)")],
        )
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if storage_on_mount:  # model downloads and conversions cached once for every pod and retry
        env |= storage_env(options.mount_path, storage=False)
    return merge_runtime_env({"env_vars": env}, options.runtime_env)


def storage_env(mount_path: str, *, storage: bool) -> dict[str, str]:
    """Caches on the shared mount (and, with `storage`, the default storage root of commands run in the pod)."""
    env = {"LORAFLEET_STORAGE": mount_path} if storage else {}
    return env | {"LORAFLEET_HOME": f"{mount_path}/cache", "HF_HOME": f"{mount_path}/cache/huggingface"}


# ---- pods -------------------------------------------------------------------------------------------


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    requests = {"cpu": cpu, "memory": memory}
    limits = dict(requests) | ({GPU_RESOURCE: gpus} if gpus else {})
    return {"requests": requests, "limits": limits}


def _cpu_quantity(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{int(value * 1000)}m"


def _worker_memory(job: JobConfig, options: ClusterOptions) -> str:
    if options.worker_memory:
        return options.worker_memory
    ray_memory = job.distributed.resources_per_worker.get("memory")  # Ray counts bytes
    if ray_memory:
        return f"{int(-(-ray_memory // 2**20))}Mi"
    return f"{max(4, 4 * int(-(-job.distributed.resources_per_worker.get('CPU', 1) // 1)))}Gi"


def _pod_template(
    job: JobConfig, options: ClusterOptions, *, role: str, resources: dict, gpu: bool = False
) -> dict[str, Any]:
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {
            "name": "dshm",
            "emptyDir": {"medium": "Memory"} | ({"sizeLimit": options.shm_size} if options.shm_size else {}),
        }
    ]
    if options.pvc:
        mounts.append({"name": "storage", "mountPath": options.mount_path})
        volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": options.pvc}})
    container: dict[str, Any] = {
        "name": f"ray-{role}",
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    if options.pvc:  # drivers started on a long-lived cluster find storage and the shared caches by default
        container["env"] = [
            {"name": name, "value": value} for name, value in storage_env(options.mount_path, storage=True).items()
        ]
    if role == "worker":  # spot/eviction: the workers checkpoint their step before the pod goes
        grace = math.ceil(job.distributed.sigterm_grace_s)
        container["lifecycle"] = {
            "preStop": {"exec": {"command": ["python", "-m", "lorafleet.pod_stop", "--wait", str(grace)]}}
        }
    if role == "head":
        container["ports"] = [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
        ]
    spec: dict[str, Any] = {
        **({"terminationGracePeriodSeconds": grace + POD_STOP_MARGIN_S} if role == "worker" else {}),
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "containers": [container],
        "volumes": volumes,
    }
    node_selector = dict(options.node_selector) | (dict(options.gpu_node_selector) if gpu else {})
    if node_selector:
        spec["nodeSelector"] = node_selector
    if gpu and options.gpu_tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in options.gpu_tolerations]
    if options.service_account:
        spec["serviceAccountName"] = options.service_account
    else:  # Ray needs no Kubernetes API: no token in the pods (the namespace's default account may hold rights)
        spec["automountServiceAccountToken"] = False
    labels = _labels(job) | {"lorafleet.io/role": role}
    return {"metadata": {"labels": labels}, "spec": spec}


def ray_cluster_spec(job: JobConfig, options: ClusterOptions) -> dict[str, Any]:
    """Head (no training work: num-cpus 0) + one worker group with one Ray Train worker per pod (a sweep: one
    per worker of each trial that runs at once)."""
    distributed = job.distributed
    pods = distributed.num_workers * ((job.sweep.max_concurrent_trials or 1) if job.sweep else 1)
    per_worker = distributed.resources_per_worker
    gpus = int(per_worker.get("GPU", 1 if distributed.use_gpu else 0)) if distributed.use_gpu else 0
    worker_resources = _resources(_cpu_quantity(per_worker.get("CPU", 1)), _worker_memory(job, options), gpus)
    worker_params: dict[str, str] = {}
    custom = {k: v for k, v in per_worker.items() if k not in ("CPU", "GPU", "memory")}
    if custom:
        worker_params["resources"] = '"' + json.dumps(custom).replace('"', '\\"') + '"'  # KubeRay's quoting
    worker: dict[str, Any] = {
        "groupName": "gpu-workers" if gpus else "cpu-workers",
        "replicas": pods,
        "minReplicas": pods,
        "maxReplicas": pods,
        "rayStartParams": worker_params,
        "template": _pod_template(job, options, role="worker", resources=worker_resources, gpu=bool(gpus)),
    }
    head = {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": _pod_template(
            job, options, role="head", resources=_resources(options.head_cpu, options.head_memory)
        ),
    }
    return {"rayVersion": RAY_VERSION, "headGroupSpec": head, "workerGroupSpecs": [worker]}


# ---- the objects ------------------------------------------------------------------------------------


def render_rayjob(job: JobConfig, run_id: str, options: ClusterOptions) -> dict[str, Any]:
    """A `ray.io/v1` RayJob running `lorafleet train` for `run_id` (same id on every retry: it resumes)."""
    config = cluster_job_config(job, options)
    storage_on_mount = is_local_uri(job.storage.uri)
    config_yaml = yaml.safe_dump(config, sort_keys=False)
    spec: dict[str, Any] = {
        "entrypoint": entrypoint_for(job, config_yaml, run_id),
        "runtimeEnvYAML": yaml.safe_dump(runtime_env_for(options, storage_on_mount=storage_on_mount), sort_keys=True),
        "submissionMode": options.submission_mode,
        "backoffLimit": options.backoff_limit,
    }
    if options.cluster:
        spec["clusterSelector"] = {"ray.io/cluster": options.cluster}
        spec["shutdownAfterJobFinishes"] = False
    else:
        spec["rayClusterSpec"] = ray_cluster_spec(job, options)
        spec["shutdownAfterJobFinishes"] = options.shutdown_after_job_finishes
        spec["ttlSecondsAfterFinished"] = options.ttl_seconds_after_finished
    if options.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = options.active_deadline_seconds
    body = {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {
            "name": options.name or k8s_name(run_id, MAX_RAYJOB_NAME),
            "namespace": options.namespace,
            "labels": _labels(job, run_id),
            "annotations": {
                "lorafleet.io/run-id": run_id,
                "lorafleet.io/config-hash": job.config_hash(),
                "lorafleet.io/storage": config["storage"]["uri"],
            },
        },
        "spec": spec,
    }
    check_rayjob(body)
    return body


def render_raycluster(job: JobConfig, options: ClusterOptions) -> dict[str, Any]:
    """A long-lived RayCluster sized for `job` (submit to it with `--address` or RayJob `--cluster`)."""
    cluster_job_config(job, options)  # the same path checks: storage and data must be visible to the pods
    name = options.name or k8s_name(job.name, MAX_RAYCLUSTER_NAME)
    body = {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": {"name": name, "namespace": options.namespace, "labels": _labels(job)},
        "spec": ray_cluster_spec(job, options),
    }
    _check_name("RayCluster", name, MAX_RAYCLUSTER_NAME)
    return body


def _check_name(kind: str, name: str, limit: int) -> list[Problem]:
    problems = []
    if len(name) > limit:
        problems.append(Problem("metadata.name", f"{kind} name {name!r} is longer than {limit} characters"))
    if not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name):
        problems.append(Problem("metadata.name", f"{kind} name {name!r} is not a DNS-1035 label"))
    return problems


def check_rayjob(body: dict[str, Any]) -> None:
    """The operator's own checks that the CRD schema cannot express (KubeRay's ValidateRayJobSpec)."""
    spec = body["spec"]
    problems = _check_name("RayJob", body["metadata"]["name"], MAX_RAYJOB_NAME)
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        problems.append(Problem("spec.submissionMode", f"must be one of {', '.join(SUBMISSION_MODES)}"))
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        problems.append(Problem("spec", "exactly one of rayClusterSpec and clusterSelector must be set"))
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
        problems.append(Problem("spec.ttlSecondsAfterFinished", "needs shutdownAfterJobFinishes: true"))
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        problems.append(Problem("spec.activeDeadlineSeconds", "must be a positive integer"))
    if spec.get("backoffLimit", 0) < 0:
        problems.append(Problem("spec.backoffLimit", "must be >= 0"))
    try:
        if not isinstance(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"), dict):
            problems.append(Problem("spec.runtimeEnvYAML", "must be a YAML mapping"))
    except yaml.YAMLError as exc:
        problems.append(Problem("spec.runtimeEnvYAML", f"invalid YAML: {exc}"))
    if problems:
        raise ConfigError(f"RayJob {body['metadata']['name']}", problems)


def to_yaml(body: dict[str, Any], header: str = "") -> str:
    text = yaml.safe_dump(body, sort_keys=False, width=4096)
    return "".join(f"# {line}\n" for line in header.splitlines()) + text
