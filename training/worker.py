"""The function every Ray Train worker runs: one fine-tune, read top to bottom.

    rebuild config → seed → tokenizer + base model → PEFT adapter → data → HF Trainer → train → report

Ray has already set up the process group (gloo on CPU, nccl on GPU) and the RANK/WORLD_SIZE variables,
so the HF Trainer (through Accelerate) runs DDP across the workers by itself. Checkpoints reach shared
storage through `ray.train.report`; a restarted worker resumes from the latest one Ray hands back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from lorafleet.config import JobConfig
from lorafleet.storage import local_path_of


def train_loop_per_worker(payload: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import PrinterCallback, Trainer, set_seed

    from training.adapters import apply_adapter
    from training.data import Collator, build_datasets
    from training.early_stopping import EarlyStopping
    from training.model import load_base_model, load_tokenizer
    from training.reporting import MetricsLog, ProgressReporter, RayCheckpointReporter

    job = JobConfig.model_validate(yaml.safe_load(payload["config"]))
    run_id, run_dir = payload["run_id"], payload["run_dir"]
    context = ray.train.get_context()
    set_seed(job.training.seed)

    tokenizer = load_tokenizer(job.model)
    model = load_base_model(job.model, job.training, ray.train.torch.get_device())
    model = apply_adapter(model, job.adapter)
    if context.get_world_rank() == 0:
        model.print_trainable_parameters()

    data = build_datasets(job.data, tokenizer, seed=job.training.seed)
    if context.get_world_rank() == 0:
        print(f"[{run_id}] data: {data.stats}", flush=True)

    output_dir = tempfile.mkdtemp(prefix=f"lorafleet-{run_id}-rank{context.get_world_rank()}-")
    callbacks = [RayCheckpointReporter(), ProgressReporter(MetricsLog(run_dir), run_id)]
    callbacks += tensorboard_callbacks(job, run_dir, context.get_world_rank())
    if job.training.early_stopping is not None:
        callbacks.append(EarlyStopping(job.training.early_stopping))
    trainer = Trainer(
        model=model,
        args=training_arguments(job, output_dir, has_eval=data.eval is not None),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressReporter prints one line per log event instead
    trainer = prepare_trainer(trainer)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        result = trainer.train()
    else:
        with checkpoint.as_directory() as resume_dir:
            print(f"[{run_id}] resuming from {checkpoint.path}", flush=True)
            result = trainer.train(resume_from_checkpoint=resume_dir)
    return {"train_loss": result.training_loss, "global_step": result.global_step, "data": data.stats_dict()}


def training_arguments(job: JobConfig, output_dir: str, *, has_eval: bool):
    from transformers import TrainingArguments

    training = job.training
    evaluate = has_eval and training.eval_steps is not None
    max_steps = training.max_steps or -1
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        num_train_epochs=training.epochs,
        per_device_train_batch_size=training.micro_batch_size,
        per_device_eval_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        bf16=training.precision == "bf16",
        fp16=training.precision == "fp16",
        use_cpu=not job.distributed.use_gpu,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=training.eval_steps,
        save_strategy="steps",
        save_steps=training.save_steps or (training.max_steps or 10**9),
        save_total_limit=1,
        logging_steps=training.logging_steps,
        logging_first_step=True,
        seed=training.seed,
        data_seed=training.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )


def tensorboard_callbacks(job: JobConfig, run_dir: str, rank: int) -> list:
    """TensorBoard event files under `<run>/tensorboard/` (rank 0, storage on a local/NFS path)."""
    local_run_dir = local_path_of(run_dir)
    if rank != 0 or "tensorboard" not in job.training.logging or local_run_dir is None:
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(Path(local_run_dir) / "tensorboard")))]
