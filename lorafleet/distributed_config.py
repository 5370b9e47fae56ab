"""The `distributed:` section of a job config: how many Ray Train workers, where they go, and how they shard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from lorafleet.schema import Section

MAX_WORKERS = 4096
MAX_WORKER_DEVICES = 1e6  # CPUs or GPUs of one worker
MAX_WORKER_RESOURCE = 1e18  # any other Ray resource (memory is in bytes)


class DeepSpeedSection(Section):
    stage: Literal[2, 3] = Field(
        2, description="ZeRO stage: 2 shards optimizer state + gradients; 3 also shards the weights (largest models)."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory: less GPU memory, slower.")
    offload_params: bool = Field(False, description="ZeRO-3: keep weights in CPU memory between uses (slowest).")
    config_file: str | None = Field(
        None, description="A DeepSpeed JSON of your own, used as is (instead of stage/offload_*); `auto` values ok."
    )

    @field_validator("config_file")
    @classmethod
    def _json_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        base_dir = (info.context or {}).get("base_dir")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (Path(base_dir) if base_dir else Path.cwd()) / path
        if not path.is_file():
            raise ValueError(f"DeepSpeed config file not found: {path}")
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(content, dict):
            raise ValueError(f"{path} must hold a JSON object (a DeepSpeed config)")
        return str(path.resolve())

    @model_validator(mode="after")
    def _consistent(self) -> DeepSpeedSection:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage: 3 (ZeRO-2 does not shard the weights)")
        if self.config_file and (self.stage != 2 or self.offload_optimizer or self.offload_params):
            raise ValueError("config_file and stage/offload_optimizer/offload_params cannot be used together")
        return self


class FsdpSection(Section):
    sharding: Literal["full_shard", "shard_grad_op"] = Field(
        "full_shard",
        description="full_shard: weights, gradients and optimizer state (least memory); shard_grad_op: not weights.",
    )
    offload_params: bool = Field(False, description="Keep sharded weights in CPU memory between uses (slower).")


class DistributedSection(Section):
    num_workers: int = Field(
        1, gt=0, le=MAX_WORKERS, description="Ray Train workers (one process each; must fit the cluster's CPUs)."
    )
    use_gpu: bool = Field(False, description="One GPU per worker.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1}, description="Ray resources per worker, e.g. {CPU: 4, GPU: 1}."
    )
    strategy: Literal["ddp", "deepspeed", "fsdp"] = Field(
        "ddp",
        description="ddp: a full replica per worker; deepspeed: ZeRO sharding (CPU and GPU); fsdp: GPU only.",
    )
    deepspeed: DeepSpeedSection | None = Field(None, description="ZeRO settings (strategy: deepspeed).")
    fsdp: FsdpSection | None = Field(None, description="FSDP settings (strategy: fsdp).")
    max_failures: int = Field(0, ge=-1, description="Restarts from the last checkpoint after a failure (-1: forever).")
    sigterm_grace_s: float = Field(
        120,
        gt=0,
        le=86400,
        description="After SIGTERM (a pod's eviction, a spot reclaim) a worker checkpoints at its next step and "
        "restarts from it; one that cannot reach a step boundary within this many seconds exits. KubeRay pods get "
        "this plus 30 s as terminationGracePeriodSeconds.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places the workers on nodes (Ray Train's ScalingConfig): PACK fills a node first, "
        "SPREAD prefers distinct nodes; STRICT_* make it a requirement.",
    )

    @model_validator(mode="after")
    def _gpus_need_use_gpu(self) -> DistributedSection:
        for name, amount in self.resources_per_worker.items():
            most = MAX_WORKER_DEVICES if name in ("CPU", "GPU") else MAX_WORKER_RESOURCE
            if not 0 <= amount <= most:
                raise ValueError(f"resources_per_worker.{name} must be from 0 to {most:g}, got {amount}")
        if self.resources_per_worker.get("GPU", 0) > 0 and not self.use_gpu:
            raise ValueError("resources_per_worker.GPU > 0 needs use_gpu: true (or drop the GPU entry)")
        if self.deepspeed is not None and self.strategy != "deepspeed":
            raise ValueError(f"distributed.deepspeed needs strategy: deepspeed (strategy is {self.strategy})")
        if self.fsdp is not None and self.strategy != "fsdp":
            raise ValueError(f"distributed.fsdp needs strategy: fsdp (strategy is {self.strategy})")
        if self.strategy == "fsdp" and not self.use_gpu:
            raise ValueError(
                "strategy: fsdp needs use_gpu: true (Accelerate runs FSDP on GPUs only and would silently fall "
                "back to DDP on CPU); on CPU use strategy: deepspeed for sharding, or ddp"
            )
        return self
