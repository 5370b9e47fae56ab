"""The function every Ray Train worker runs: one fine-tune, read top to bottom.

    train_loop_per_worker:  rebuild config → build_hf_trainer → resume from Ray's checkpoint, if any → train
    build_hf_trainer:          seed → checks → tokenizer → data → TrainingArguments → base model → adapter → Trainer

Ray has already set up the process group (gloo on CPU, nccl on GPU) and the RANK/WORLD_SIZE variables,
so the HF Trainer (through Accelerate) runs DDP, DeepSpeed or FSDP across the workers by itself.
Checkpoints (adapter, optimizer, scheduler, RNG, trainer state with the data position) reach shared
storage through `ray.train.report`; a restarted worker resumes from the latest complete one Ray hands back.

`build_hf_trainer` needs no Ray: tests and benchmarks call it in-process on one CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from lorafleet.config import JobConfig
from lorafleet.errors import LorafleetError

CHECKPOINT_MARKERS = ("trainer_state.json", "adapter_config.json")  # the HF Trainer writes trainer_state last


def train_loop_per_worker(payload: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    from lorafleet.training.preemption import PreemptionCheckpoint, install_sigterm_handler
    from lorafleet.training.reporting import MetricsLog, RayCheckpointReporter

    job = JobConfig.model_validate(yaml.safe_load(payload["config"]))
    run_id = payload["run_id"]
    rank = ray.train.get_context().get_world_rank()
    workers = worker_placement(run_id, rank)
    install_sigterm_handler(job.distributed.sigterm_grace_s)
    drain_notice = getattr(ray.train, "get_preemption_info", None)  # a node's drain, where this Ray reports one
    preemption = PreemptionCheckpoint(run_id, MetricsLog(payload["run_dir"]), drain_notice=drain_notice)
    trainer, data = build_hf_trainer(
        job,
        run_id=run_id,
        run_dir=payload["run_dir"],
        device=ray.train.torch.get_device(),
        rank=rank,
        deepspeed=payload.get("deepspeed"),
        callbacks=[RayCheckpointReporter(), preemption],
        workers=workers,
    )

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        result = trainer.train()
    else:
        with checkpoint.as_directory() as resume_dir:
            require_complete_checkpoint(resume_dir)
            print(f"[{run_id}] resuming from {checkpoint.path}", flush=True)
            result = trainer.train(resume_from_checkpoint=resume_dir)
    if preemption.reason is not None:
        raise preemption.error()  # a failure to Ray Train: it restarts the group from the checkpoint just saved
    return {"train_loss": result.training_loss, "global_step": result.global_step, "data": data.stats_dict()}


def build_hf_trainer(
    job: JobConfig,
    *,
    run_id: str,
    run_dir: str,
    device,
    rank: int = 0,
    deepspeed: dict[str, Any] | None = None,
    callbacks: list | tuple = (),
    output_dir: str | None = None,
    workers: list[dict] | None = None,
):
    """(trainer, data): an HF Trainer ready to `.train()` on this process's share of the job."""
    from transformers import PrinterCallback, set_seed

    from lorafleet.training.data import Collator, build_datasets
    from lorafleet.training.labelled_logits import LabelledLogits
    from lorafleet.training.model import load_tokenizer, with_resolved_precision
    from lorafleet.training.strategies import require_engine
    from lorafleet.training.trainer import FineTuneTrainer

    set_seed(job.training.seed)
    job, precision = with_resolved_precision(job, device)
    if rank == 0:
        print(f"[{run_id}] {precision.describe()}", flush=True)
    check_on_worker(job, device)

    tokenizer = load_tokenizer(job.model)
    data = build_datasets(job.data, tokenizer, seed=job.training.seed)
    if rank == 0:
        print(f"[{run_id}] data: {data.stats}", flush=True)

    # Arguments before the model: with ZeRO-3 they make from_pretrained load the weights already partitioned.
    output_dir = output_dir or tempfile.mkdtemp(prefix=f"lorafleet-{run_id}-rank{rank}-")
    args = training_arguments(job, output_dir, has_eval=data.eval is not None, run_name=run_id, deepspeed=deepspeed)

    model = peft_model(job, device, rank, deepspeed)
    labelled_logits = LabelledLogits(model) if job.training.logits == "labelled" else None

    trainer = FineTuneTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[*callbacks, *run_callbacks(job, run_id, run_dir, rank, workers, precision)],
        labelled_logits=labelled_logits,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressReporter prints one line per log event instead
    require_engine(trainer, job.distributed.strategy)
    return trainer, data


def peft_model(job: JobConfig, device, rank: int, deepspeed: dict[str, Any] | None):
    """The base (in the dtype its resolved precision and strategy call for) with the job's adapter on it."""
    from lorafleet.training.adapters import apply_adapter
    from lorafleet.training.model import load_base_model
    from lorafleet.training.packed_attention import use_packed_attention
    from lorafleet.training.strategies import quantized_storage_dtype

    model = load_base_model(
        job.model,
        job.training,
        device,
        strategy=job.distributed.strategy,
        quant_storage=quantized_storage_dtype(job, deepspeed),
    )
    if job.data.packing and device.type == "cpu":
        use_packed_attention(model)  # each packed example's own attention, not a block-diagonal mask over the row
    model = apply_adapter(model, job.adapter)
    if rank == 0:
        model.print_trainable_parameters()
    return model


def check_on_worker(job: JobConfig, device) -> None:
    """What only the worker's own device can tell: precision, strategy, sinks; then join DeepSpeed's comm layer."""
    from lorafleet.training.model import check_precision
    from lorafleet.training.sinks import check_sinks
    from lorafleet.training.strategies import check_strategy, join_deepspeed_to_process_group

    check_precision(job.training.precision, device)
    check_strategy(job, device.type)
    check_sinks(job.training.logging)
    join_deepspeed_to_process_group(job)


def run_callbacks(
    job: JobConfig, run_id: str, run_dir: str, rank: int, workers: list[dict] | None = None, precision=None
) -> list:
    """Progress lines and metrics.jsonl, the configured sinks, the divergence guard, and early stopping."""
    from lorafleet.training.divergence import DivergenceGuard
    from lorafleet.training.early_stopping import EarlyStopping
    from lorafleet.training.reporting import MetricsLog, ProgressReporter
    from lorafleet.training.sinks import sink_callbacks

    # The guard comes after the progress line, so the console and metrics.jsonl show the step that diverged.
    progress = ProgressReporter(MetricsLog(run_dir), run_id, workers, precision)
    callbacks = [progress, *sink_callbacks(job, run_dir, rank), DivergenceGuard()]
    if job.training.early_stopping is not None:
        callbacks.append(EarlyStopping(job.training.early_stopping))
    return callbacks


def training_arguments(
    job: JobConfig, output_dir: str, *, has_eval: bool, run_name: str | None = None, deepspeed: dict | None = None
):
    from transformers import TrainingArguments

    from lorafleet.training.strategies import strategy_arguments

    training = job.training
    evaluate = has_eval and training.eval_steps is not None
    return TrainingArguments(
        output_dir=output_dir,
        run_name=run_name,
        max_steps=training.max_steps or -1,
        num_train_epochs=training.epochs,
        per_device_train_batch_size=training.micro_batch_size,
        per_device_eval_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_steps if training.warmup_steps is not None else training.warmup_ratio,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        bf16=training.precision == "bf16",
        fp16=training.precision == "fp16",
        use_cpu=not job.distributed.use_gpu,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=training.eval_steps,
        save_strategy="steps",
        save_steps=training.save_steps or (training.max_steps or 10**9),
        save_total_limit=1,  # the local scratch copy; Ray keeps `keep_checkpoints` on shared storage
        logging_steps=training.logging_steps,
        logging_first_step=True,
        seed=training.seed,
        data_seed=training.seed,
        report_to="none",  # sinks are added as callbacks (training/sinks.py), on rank 0 only
        disable_tqdm=True,
        remove_unused_columns=False,
        prediction_loss_only=True,  # eval_loss is all the Trainer's evaluation reports; logits are not gathered
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        **strategy_arguments(job, deepspeed),
    )


def require_complete_checkpoint(folder: str) -> None:
    """Resume only from a checkpoint the HF Trainer finished writing."""
    missing = [name for name in CHECKPOINT_MARKERS if not (Path(folder) / name).is_file()]
    if missing:
        raise LorafleetError(f"checkpoint {folder} is incomplete (no {', '.join(missing)}); it cannot be resumed")


def worker_placement(run_id: str, rank: int) -> list[dict]:
    """Where every rank of this worker group runs (as the workers themselves report it), printed per rank."""
    import socket

    import ray
    import torch.distributed as dist

    mine = {"rank": rank, "node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname()}  # fmt: skip
    print(f"[{run_id}] rank {rank} on node {mine['node_ip']} ({mine['node_id'][:12]})", flush=True)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return sorted(everyone, key=lambda worker: worker["rank"])

