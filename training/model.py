"""Load the base model and tokenizer a job names: precision, quantization, gradient checkpointing.

Everything a device may not support is checked before any weight is read, with what to change:
- precision: bf16 runs on CPU (autocast) and on CUDA GPUs that have it; fp16 needs a CUDA GPU. `auto` is resolved
  on the worker's own device (`lorafleet.precision`), and every rank takes the lowest any rank resolved.
- quantization (QLoRA 4-bit nf4/fp4, 8-bit) goes through bitsandbytes, which runs on CUDA and, from the
  version pinned here on, on CPU. A tiny quantized layer is run forward and backward on the worker's device
  first; where that fails the job stops with the reason, and it never trains an unquantized model instead.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from lorafleet.config import JobConfig, ModelSection, TrainingSection
from lorafleet.errors import LorafleetError
from lorafleet.model_loading import load_base_model_weights, load_base_tokenizer
from lorafleet.precision import Precision, resolve_precision

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_ORDER = ("fp32", "fp16", "bf16")  # ranks that disagree all take the lowest


class UnsupportedOnDevice(LorafleetError):
    pass


def load_tokenizer(model: ModelSection):
    tokenizer = load_base_tokenizer(
        model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weights_dtype(model: ModelSection, precision: str = "fp32", strategy: str = "ddp") -> torch.dtype:
    """The base's dtype when loaded (`model.dtype: auto`): quantized bases keep their compute dtype; under bf16
    with DDP the frozen base is held in bf16 (autocast would otherwise cast every weight at every step; the
    trainable parameters stay fp32, see `apply_adapter`); else fp32. ZeRO and FSDP place dtypes themselves."""
    if model.dtype != "auto":
        return TORCH_DTYPES[model.dtype]
    if model.quantization != "none":
        return TORCH_DTYPES[model.bnb_4bit_compute_dtype]
    return torch.bfloat16 if precision == "bf16" and strategy == "ddp" else torch.float32


def with_resolved_precision(job: JobConfig, device: torch.device) -> tuple[JobConfig, Precision]:
    """`job` with `training.precision` resolved on this worker's device; with several ranks, all take the lowest."""
    precision = resolve_precision(job.training.precision, device)
    if precision.requested == "auto":
        precision = _agreed(precision, device)
    training = job.training.model_copy(update={"precision": precision.name})
    return job.model_copy(update={"training": training}), precision


def _agreed(precision: Precision, device: torch.device) -> Precision:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return precision
    code = torch.tensor([PRECISION_ORDER.index(precision.name)], device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MIN)
    lowest = PRECISION_ORDER[int(code.item())]
    if lowest == precision.name:
        return precision
    return Precision("auto", lowest, f"another worker's device resolved auto to {lowest} (this one: {precision.name})")


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 needs CUDA; bf16 needs CPU autocast (always there) or a GPU that supports it."""
    if precision == "fp16" and device.type != "cuda":
        raise UnsupportedOnDevice(
            f"training.precision: fp16 needs a CUDA GPU (this worker has {device.type}); use bf16 or fp32"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UnsupportedOnDevice(
            f"training.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or fp32"
        )


def load_base_model(
    model: ModelSection,
    training: TrainingSection,
    device: torch.device,
    *,
    strategy: str = "ddp",
    quant_storage: torch.dtype | None = None,
):
    """The base on `device`; `quant_storage` packs 4-bit weights in a float dtype so FSDP/ZeRO-3 can shard them.
    `training.precision` is already resolved (`with_resolved_precision`)."""
    check_precision(training.precision, device)
    kwargs = {}
    if model.quantization != "none":
        kwargs["quantization_config"] = quantization_config(model, device, quant_storage=quant_storage)
        if quant_storage is None:  # sharded strategies place the weights themselves
            kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": device.type}
    base = load_base_model_weights(
        model.name_or_path,
        revision=model.revision,
        dtype=weights_dtype(model, training.precision, strategy),
        trust_remote_code=model.trust_remote_code,
        **kwargs,
    )
    if model.quantization == "none":
        base.to(device)
    else:
        require_quantized_layers(base, model.quantization)
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if model.gradient_checkpointing and model.quantization == "none":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    base.config.use_cache = False
    return base


def quantization_config(model: ModelSection, device: torch.device, *, quant_storage: torch.dtype | None = None):
    check_quantization(model, device)
    from transformers import BitsAndBytesConfig

    if model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[model.bnb_4bit_compute_dtype],
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
    )


def check_quantization(model: ModelSection, device: torch.device) -> None:
    """Run one tiny quantized layer forward and backward on `device`; a clear error where bitsandbytes can't."""
    mode = model.quantization
    if not bitsandbytes_installed():
        raise UnsupportedOnDevice(
            f"model.quantization: {mode} needs bitsandbytes: pip install 'bitsandbytes>=0.50' "
            "(or set model.quantization: none)"
        )
    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # per-call cast notices
    compute = TORCH_DTYPES[model.bnb_4bit_compute_dtype]
    try:
        if mode == "4bit":
            layer = bnb.nn.Linear4bit(
                64, 64, bias=False, compute_dtype=compute, quant_type=model.bnb_4bit_quant_type
            ).to(device)
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to(device)
            compute = torch.float16
        probe = torch.randn(2, 64, device=device, dtype=compute, requires_grad=True)
        layer(probe).float().sum().backward()
        if not isinstance(layer.weight, bnb.nn.Params4bit | bnb.nn.Int8Params) or probe.grad is None:
            raise RuntimeError("the layer was not quantized")
    except Exception as exc:  # noqa: BLE001 - whatever bitsandbytes raises, the answer is the same
        raise UnsupportedOnDevice(
            f"model.quantization: {mode} cannot run on {device.type} with bitsandbytes {bnb.__version__} "
            f"({type(exc).__name__}: {exc}); use a CUDA worker (distributed.use_gpu: true), a bitsandbytes "
            "with a backend for this device, or model.quantization: none"
        ) from exc


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_quantized_layers(model: torch.nn.Module, mode: str) -> None:
    """Never train an unquantized base when quantization was asked for."""
    import bitsandbytes as bnb

    kind = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    if not any(isinstance(module, kind) for module in model.modules()):
        raise UnsupportedOnDevice(f"model.quantization: {mode} was requested but the base has no {kind.__name__} layer")
