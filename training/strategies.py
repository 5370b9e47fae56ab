"""How the workers share the model: DDP, DeepSpeed ZeRO 2/3, FSDP — as HF Trainer / Accelerate settings.

    distributed:
      strategy: deepspeed
      deepspeed: {stage: 3, offload_optimizer: true, offload_params: true}   # or {config_file: ds.json}

Ray has already built the process group; the HF Trainer hands the model to DeepSpeed or FSDP through
Accelerate (`TrainingArguments(deepspeed=dict)`, `TrainingArguments(fsdp=True, fsdp_config=dict)`).
Generated DeepSpeed configs leave batch sizes, clipping and precision as `auto`, so the Trainer fills them in
from the job and the two can never disagree.

Where each runs (checked before workers start, and again in each worker):
- ddp: CPU (gloo) and GPU (nccl).
- deepspeed: CPU (DeepSpeed's CPU accelerator, gloo) and GPU; needs the deepspeed package.
- fsdp: GPU only. Accelerate enables FSDP only on GPU-like devices and would silently run plain DDP on CPU.
After the Trainer is built, `require_engine` checks that the strategy really took effect.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from lorafleet.config import JobConfig
from lorafleet.distributed_config import DeepSpeedSection, FsdpSection
from lorafleet.errors import LorafleetError


class StrategyUnavailable(LorafleetError):
    pass


def check_strategy(job: JobConfig, device_type: str) -> None:
    """Fail early where the job's strategy cannot run on `device_type` ("cpu" or "cuda")."""
    strategy = job.distributed.strategy
    if strategy == "deepspeed" and not deepspeed_installed():
        raise StrategyUnavailable(
            "distributed.strategy: deepspeed needs the deepspeed package: pip install 'deepspeed>=0.19' "
            "(or use strategy: ddp)"
        )
    if strategy == "fsdp" and device_type != "cuda":
        raise StrategyUnavailable(
            f"distributed.strategy: fsdp needs CUDA workers (this one has {device_type}): Accelerate runs FSDP "
            "on GPUs only. On CPU use strategy: deepspeed (ZeRO sharding) or ddp"
        )


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def deepspeed_config(job: JobConfig) -> dict[str, Any]:
    """The DeepSpeed JSON of the job: the user's `config_file` as is, or one generated from `distributed.deepspeed`."""
    settings = job.distributed.deepspeed or DeepSpeedSection()
    if settings.config_file:
        return json.loads(Path(settings.config_file).read_text())
    pin = job.distributed.use_gpu  # pinned host memory speeds up GPU<->CPU copies; pointless without a GPU
    zero: dict[str, Any] = {
        "stage": settings.stage,
        "overlap_comm": job.distributed.use_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if settings.stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": True,  # checkpoints hold the whole adapter
        }
        if settings.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if settings.offload_optimizer:
        # DeepSpeed's own CPU Adam steps the offloaded optimizer state (a client torch optimizer is much slower).
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def fsdp_config(job: JobConfig) -> dict[str, Any]:
    """Accelerate FSDP2 settings (`TrainingArguments.fsdp_config`); layers to wrap come from the model."""
    settings = job.distributed.fsdp or FsdpSection()
    return {
        "version": 2,
        "reshard_after_forward": settings.sharding == "full_shard",
        "cpu_offload": settings.offload_params,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # wraps the model's `_no_split_modules` (decoder layers)
        "state_dict_type": "FULL_STATE_DICT",  # checkpoints hold a plain PEFT adapter (export reads it)
        "cpu_ram_efficient_loading": True,
        "activation_checkpointing": job.model.gradient_checkpointing,
    }


def strategy_arguments(job: JobConfig, deepspeed: dict[str, Any] | None) -> dict[str, Any]:
    """The TrainingArguments keywords that select the strategy."""
    strategy = job.distributed.strategy
    if strategy == "deepspeed":
        return {"deepspeed": deepspeed if deepspeed is not None else deepspeed_config(job)}
    if strategy == "fsdp":
        return {"fsdp": True, "fsdp_config": fsdp_config(job)}
    return {"ddp_find_unused_parameters": False}


def join_deepspeed_to_process_group(job: JobConfig) -> None:
    """Hand DeepSpeed the process group Ray already set up.

    DeepSpeed's comm layer is separate from torch.distributed: left alone it believes world_size is 1, so ZeRO-3's
    partitioned loading and its batch-size check (micro x accumulation x world) disagree with the Trainer's.
    """
    import torch.distributed

    if job.distributed.strategy != "deepspeed" or not torch.distributed.is_initialized():
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False, verbose=False)


def require_engine(trainer, strategy: str) -> None:
    """Stop if Accelerate quietly dropped the requested strategy (it falls back to DDP where unsupported)."""
    if strategy == "deepspeed" and not trainer.is_deepspeed_enabled:
        raise StrategyUnavailable("distributed.strategy: deepspeed was requested but Accelerate did not enable it")
    if strategy == "fsdp" and not trainer.is_fsdp_enabled:
        raise StrategyUnavailable(
            "distributed.strategy: fsdp was requested but Accelerate did not enable it (FSDP needs CUDA workers)"
        )


def zero_stage(job: JobConfig, deepspeed: dict[str, Any] | None = None) -> int | None:
    """The ZeRO stage the job runs with (a user's config file included); None without DeepSpeed."""
    if job.distributed.strategy != "deepspeed":
        return None
    config = deepspeed if deepspeed is not None else deepspeed_config(job)
    return int(config.get("zero_optimization", {}).get("stage", 0))


def quantized_storage_dtype(job: JobConfig, deepspeed: dict[str, Any] | None = None):
    """Sharding 4-bit weights (FSDP, ZeRO-3) needs them packed in a float dtype; None where not sharded."""
    from lorafleet.training.model import TORCH_DTYPES

    sharded = job.distributed.strategy == "fsdp" or zero_stage(job, deepspeed) == 3
    if job.model.quantization == "4bit" and sharded:
        return TORCH_DTYPES[job.model.bnb_4bit_compute_dtype]
    return None
