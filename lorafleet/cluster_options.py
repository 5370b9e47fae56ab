"""How a job becomes pods: the cluster options, one typed object with the defaults, built once per command.

The CLI flags that set them are declared in `lorafleet.cli.cluster_flags`; a `--k8s-options FILE.yaml` holds the
same fields. `lorafleet.kuberay` renders the objects from a job config and these options.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafleet.errors import ConfigError
from lorafleet.versions import DEFAULT_IMAGE
from lorafleet.yamlsource import validation_problems

QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
GPU_RESOURCE = "nvidia.com/gpu"


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """`key[=value][:Effect]`, e.g. `nvidia.com/gpu:NoSchedule` or `pool=gpu:NoExecute`."""
        body, _, effect = text.partition(":")
        key, sep, value = body.partition("=")
        return cls(
            key=key or None, operator="Equal" if sep else "Exists", value=value if sep else None, effect=effect or None
        )


class ClusterOptions(BaseModel):
    """How a job becomes pods; everything the job config does not say. Defaults live here."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    image: str = Field(DEFAULT_IMAGE, description="Image of every Ray pod; must have lorafleet installed.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    namespace: str = Field("lorafleet", pattern=DNS1123_LABEL, description="Namespace of the objects.")
    name: str | None = Field(None, description="Object name (default: from the run id / job name).")
    cluster: str | None = Field(None, description="Run on this existing RayCluster (clusterSelector).")
    pvc: str | None = Field("lorafleet-storage", description="ReadWriteMany claim holding shared storage.")
    mount_path: str = Field("/mnt/lorafleet", description="Where the claim is mounted in every pod.")
    service_account: str | None = Field(
        None, description="Service account of the Ray pods (default: none, and no API token mounted)."
    )
    head_cpu: str = Field("2", pattern=QUANTITY)
    head_memory: str = Field("8Gi", pattern=QUANTITY)
    worker_memory: str | None = Field(
        None, pattern=QUANTITY, description="Worker pod memory, e.g. 64Gi (default: 4Gi per worker CPU)."
    )
    shm_size: str | None = Field(None, pattern=QUANTITY, description="/dev/shm (memory-backed) size limit.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="For every pod.")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict, description="Added for GPU worker pods.")
    gpu_tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
    )
    submission_mode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] = Field(
        "K8sJobMode", description="How KubeRay submits the job: K8sJobMode, HTTPMode, InteractiveMode or SidecarMode."
    )
    shutdown_after_job_finishes: bool = True
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="Keep the finished cluster this long.")
    active_deadline_seconds: int | None = Field(None, gt=0, description="Fail the job after this long.")
    backoff_limit: int = Field(0, ge=0, description="Retries; each one creates a new RayCluster.")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Merged into the job's runtime env.")

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path, got {value!r}")
        return value.rstrip("/") or "/"

    @field_validator("pvc", "cluster", "service_account")
    @classmethod
    def _dns_name(cls, value: str | None) -> str | None:
        if value is not None and not re.match(DNS1123_SUBDOMAIN, value):
            raise ValueError(f"{value!r} is not a valid Kubernetes name (lowercase letters, digits, '-', '.')")
        return value

    @model_validator(mode="after")
    def _kuberay_rules(self) -> ClusterOptions:
        if self.submission_mode == "InteractiveMode" and self.backoff_limit > 0:
            raise ValueError("backoff_limit > 0 cannot be used with submission_mode InteractiveMode (KubeRay rule)")
        if self.cluster and self.submission_mode == "SidecarMode":
            raise ValueError("cluster (clusterSelector) cannot be used with submission_mode SidecarMode")
        if not self.shutdown_after_job_finishes and self.ttl_seconds_after_finished > 0 and not self.cluster:
            raise ValueError("ttl_seconds_after_finished needs shutdown_after_job_finishes: true (or set it to 0)")
        return self


def load_cluster_options(values: dict[str, Any], source: str = "cluster options") -> ClusterOptions:
    """Validate options (CLI flags over an options file); every problem at once, as a ConfigError."""
    try:
        return ClusterOptions.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(source, validation_problems(exc, where=lambda keys: ".".join(keys) or "(options)")) from None
