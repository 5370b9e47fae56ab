"""The job config: the only input of a run, validated once and typed everywhere after.

    lorafleet validate configs/tiny.yaml --set training.max_steps=20

Every section forbids unknown keys, so a typo fails loudly instead of being ignored. Defaults live here
and nowhere else. `load_job_config` reports every problem at once, each with its field path and the
file:line it came from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from lorafleet.adapter_config import (
    PROMPT_LEARNING_METHODS,
    AdapterSection,
    LoraSection,
    adapter_knob_message,
    yaml_keys,
)
from lorafleet.distributed_config import DeepSpeedSection, DistributedSection
from lorafleet.errors import ConfigError, Problem
from lorafleet.names import NAME_RULE, is_valid_name
from lorafleet.paths import default_storage_uri
from lorafleet.schema import Section
from lorafleet.sweep_config import SweepSection
from lorafleet.sweep_trials import check_sweep
from lorafleet.yamlsource import UNKNOWN_KEY, YamlSource, apply_overrides, validation_message

DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# Sanity bounds: past these a value is a typo, and would overflow or hang far from the line that set it.
MAX_STEPS = 10**9


class ModelSection(Section):
    name_or_path: str = Field(
        description="`builtin:smollm2-135m-instruct`, `builtin:tiny-llama`, a local HF folder or a hub id."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype when loaded; `auto` follows `training.precision`."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Load the base quantized with bitsandbytes (4bit = QLoRA): ~4x / ~2x less weight memory. "
        "Runs on CUDA, and on CPU with bitsandbytes >= 0.48 (slow: for tests); checked before training.",
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (nf4 for QLoRA).")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Matmul dtype of 4-bit layers."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% slower.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off unless you trust it.")

    @field_validator("name_or_path")
    @classmethod
    def _not_blank(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if value.startswith((".", "/", "~")):  # a local folder: checked now, without loading anything
            base_dir = (info.context or {}).get("base_dir")
            folder = Path(value).expanduser()
            folder = folder if folder.is_absolute() else (Path(base_dir) if base_dir else Path.cwd()) / folder
            if not folder.is_dir():
                raise ValueError(f"model folder not found: {folder}")
            if not (folder / "config.json").is_file():
                raise ValueError(f"{folder} is not a model folder: it has no config.json")
        return value


class DataSection(Section):
    train: str = Field(description="A local .json/.jsonl/.csv/.parquet file, `builtin:<name>`, or a hub dataset.")
    eval: str | None = Field(None, description="Validation data; if absent, `val_split` of train is held out.")
    val_split: float = Field(0.1, ge=0, lt=1, description="Share of train held out when `eval` is not set.")
    format: Literal["alpaca", "chat", "completion", "text"] = Field(
        "alpaca", description="Row shape: alpaca (instruction/input/output), chat (messages), completion, text."
    )
    max_seq_len: int = Field(512, ge=8, description="Tokens per example; longer examples are truncated.")
    packing: bool = Field(False, description="Pack several examples per sequence (faster on short data).")
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt tokens.")
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows (quick experiments).")

    @field_validator("train", "eval")
    @classmethod
    def _local_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        base_dir = (info.context or {}).get("base_dir")
        return resolve_data_reference(value, Path(base_dir) if base_dir else Path.cwd())


class EarlyStoppingSection(Section):
    patience: int = Field(3, gt=0, description="Evaluations without improvement before stopping.")
    metric: str = Field("eval_loss", description="Metric watched (reported at each evaluation).")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")


class TrainingSection(Section):
    max_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="Stop after this many optimizer steps (wins over epochs)."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training data when max_steps is not set.")
    micro_batch_size: int = Field(2, gt=0, description="Examples per worker per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps spent warming up.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (instead of warmup_ratio).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Mixed precision over fp32 master weights: bf16 (CPU, Ampere+ GPUs) or fp16 (CUDA GPUs only); "
        "`auto`: bf16 where the device computes it natively (measured once per machine), else fp16 on GPUs "
        "without bf16, else fp32.",
    )
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (and at the end).")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps (and at the end).")
    logging_steps: int = Field(1, gt=0, description="Report metrics every N steps.")
    logits: Literal["labelled", "all"] = Field(
        "labelled",
        description="Where the LM head runs: only at positions whose next token is a label (the same loss and "
        "gradients, fewer FLOPs), or at every position.",
    )
    seed: int = Field(42, ge=0)
    logging: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Metric sinks besides metrics.jsonl."
    )
    early_stopping: EarlyStoppingSection | None = Field(
        None, description="Stop when the watched eval metric stops improving (needs eval_steps)."
    )
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept on storage (best by `best_metric`).")
    best_metric: str | None = Field(
        None, description="Keep the best checkpoints by this metric (e.g. eval_loss) instead of the newest."
    )
    best_metric_mode: Literal["min", "max"] = Field("min")

    @model_validator(mode="after")
    def _eval_features_need_eval_steps(self) -> TrainingSection:
        if self.warmup_steps is not None and self.warmup_ratio > 0:
            raise ValueError("warmup_steps and warmup_ratio cannot be used together (set one)")
        if self.early_stopping is not None and self.eval_steps is None:
            raise ValueError("early_stopping needs eval_steps (evaluations to compare)")
        if self.best_metric is not None and self.best_metric.startswith("eval_") and self.eval_steps is None:
            raise ValueError(f"best_metric: {self.best_metric} needs eval_steps")
        if self.eval_steps and self.save_steps and self.best_metric and self.save_steps % self.eval_steps:
            raise ValueError("save_steps must be a multiple of eval_steps when best_metric is set")
        return self


class StorageSection(Section):
    uri: str = Field(
        default_factory=default_storage_uri,
        description="Shared storage root: a path (local/NFS/PVC), file:// or s3://. Runs go to <uri>/runs/<id>.",
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError("must not be empty: leave storage out for the default, or give a path or URI")
        if "://" in value:
            scheme = value.split("://", 1)[0]
            if scheme not in ("file", "s3", "gs", "abfs"):
                raise ValueError(f"unsupported scheme {scheme!r}: use a path, file://, s3://, gs:// or abfs://")
            return value
        base_dir = (info.context or {}).get("base_dir")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (Path(base_dir) if base_dir else Path.cwd()) / path
        return str(path.resolve())


BaselineName = Literal["median", "tfidf_ridge", "majority", "tfidf_logreg", "most_common"]


# `eval.compare` / `lorafleet eval --compare`: fp32 and the methods of lorafleet.quantization (kept equal by a test)
CompareVariant = Literal["fp32", "int8", "int4", "gptq-w4a16", "w8a8"]


class EvalSection(Section):
    split: Literal["val", "test"] = Field(
        "val", description="`val`: data.eval, else train's seeded val_split holdout; `test`: train's test file."
    )
    max_examples: int | None = Field(200, gt=0, description="Evaluate the first N examples (null: all; slow).")
    max_new_tokens: int = Field(64, gt=0, description="Generation budget per answer (greedy decoding).")
    batch_size: int = Field(8, gt=0, description="Examples per forward pass / generate call.")
    task: Literal["auto", "numeric", "classification", "text"] = Field(
        "auto", description="Which generation metrics: auto-detected from the reference answers unless set."
    )
    decoding: Literal["auto", "greedy", "sampled"] = Field(
        "auto",
        description="How answers are read: greedy, or `sampled` (k answers per example, aggregated) scored beside "
        "greedy. auto: sampled for numeric tasks (a number's distribution, not its most likely first digit), "
        "greedy otherwise.",
    )
    samples: int = Field(16, ge=2, le=128, description="Sampled decoding: answers drawn per example (k).")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampled decoding: sampling temperature.")
    seed: int = Field(0, ge=0, le=2**62, description="Sampled decoding: seed (the same seed, the same answers).")
    aggregate: Literal["auto", "median", "geometric_mean", "mean", "majority"] = Field(
        "auto",
        description="Sampled decoding: how k answers become one. Numbers: median, geometric_mean (auto), mean; "
        "labels: majority (auto; self-consistency).",
    )
    baselines: list[BaselineName] = Field(
        default_factory=lambda: list(get_args(BaselineName)),
        description="Baselines fitted on the run's training rows and scored beside the models (those that apply "
        "to the task: median, tfidf_ridge for numeric; majority, tfidf_logreg for classification; most_common "
        "for text). []: none.",
    )
    compare: list[CompareVariant] = Field(
        default_factory=list,
        description="Quantized variants of the merged run to compare (`lorafleet eval --compare`): perplexity, "
        "task metric, CPU-engine prefill/decode tokens/s, memory and file size in report/quantization.md. "
        "[]: the usual base vs fine-tuned eval.",
    )


class JobConfig(Section):
    name: str = Field(description="Job name: runs are named after it.")
    model: ModelSection
    adapter: AdapterSection = Field(default_factory=LoraSection, description="PEFT method and its knobs.")
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    sweep: SweepSection | None = Field(
        None, description="A search space for `lorafleet sweep` (Ray Tune); `lorafleet train` ignores it."
    )

    @field_validator("name")
    @classmethod
    def _name_rule(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError(f"invalid job name {value!r}: use {NAME_RULE}")
        return value

    @model_validator(mode="after")
    def _cross_section_rules(self) -> JobConfig:
        if self.data.packing and self.adapter.method in PROMPT_LEARNING_METHODS:
            raise ValueError(
                f"data.packing and adapter.method: {self.adapter.method} cannot be used together "
                "(virtual tokens break per-example attention in packed sequences)"
            )
        if self.training.precision == "fp16" and not self.distributed.use_gpu:
            raise ValueError("training.precision: fp16 needs distributed.use_gpu: true (use bf16 or fp32 on CPU)")
        distributed = self.distributed
        zero3 = distributed.strategy == "deepspeed" and (distributed.deepspeed or DeepSpeedSection()).stage == 3
        if self.model.quantization == "8bit" and (zero3 or distributed.strategy == "fsdp"):
            raise ValueError(
                f"model.quantization: 8bit and strategy: {distributed.strategy} (sharded weights) cannot be used "
                "together; use quantization: 4bit (QLoRA shards), or ZeRO stage 2"
            )
        if self.model.quantization == "4bit" and distributed.strategy == "fsdp":
            raise ValueError(
                "model.quantization: 4bit and strategy: fsdp cannot be used together: the FSDP2 that Accelerate "
                "runs here cannot shard bitsandbytes 4-bit weights; use strategy: deepspeed with deepspeed.stage: 3 "
                "(QLoRA weights are stored as bf16 and sharded) or ddp"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def config_hash(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


def resolve_data_reference(value: str, base_dir: Path) -> str:
    """A local data file becomes an absolute path (and must exist); builtin: and hub names pass through."""
    if not value.strip():
        raise ValueError("must not be empty: a data file, `builtin:<name>` or a hub dataset")
    if value.startswith("builtin:"):
        return value
    looks_local = value.endswith(DATA_FILE_SUFFIXES) or value.startswith((".", "/", "~"))
    if not looks_local:
        return value  # a hub dataset name such as "tatsu-lab/alpaca"
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.exists():
        raise ValueError(f"data file not found: {path}")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
        raise ValueError(f"data file {path} is {kind}")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {path} is empty: nothing to train or evaluate on")
    return str(path.resolve())


def load_job_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read, override (`key.path=value`) and validate a job YAML; raise ConfigError with every problem."""
    source = YamlSource.read(Path(path))
    return validate_job_config(apply_overrides(source.data, overrides or [], str(path)), source)


def validate_job_config(data: Any, source: YamlSource) -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError(source.name, [Problem(source.name, "the top level must be a mapping of sections")])
    try:
        job = JobConfig.model_validate(data, context={"base_dir": str(source.base_dir)})
    except ValidationError as exc:
        raise ConfigError(source.name, [_problem_from(error, source) for error in exc.errors()]) from None
    return check_sweep(job, source)


def _problem_from(error: dict[str, Any], source: YamlSource) -> Problem:
    keys, method = yaml_keys(error["loc"])
    if error["type"] == "extra_forbidden":
        message = adapter_knob_message(keys[-1], method) if method else f"{UNKNOWN_KEY}; see docs/config.md"
    else:
        message = validation_message(error)
    return Problem(f"{source.location_of(keys)} {'.'.join(keys) or '(top level)'}", message)
