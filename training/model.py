"""Load the base model and tokenizer a job names: precision, quantization, gradient checkpointing.

Quantized loading (QLoRA 4-bit, 8-bit) goes through bitsandbytes and is checked before any weight is
read: where bitsandbytes cannot run on this device the job fails with what it needs, and never trains
an unquantized model in its place.
"""

from __future__ import annotations

import importlib.util

import torch

from lorafleet.config import ModelSection, TrainingSection
from lorafleet.errors import LorafleetError
from lorafleet.models import resolve_model

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.float32, "fp16": torch.float32}


def load_tokenizer(model: ModelSection):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(model.name_or_path), revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weights_dtype(model: ModelSection, training: TrainingSection) -> torch.dtype:
    """`auto`: fp32 master weights (mixed precision autocasts); quantized bases keep their compute dtype."""
    if model.dtype != "auto":
        return TORCH_DTYPES[model.dtype]
    if model.quantization != "none":
        return TORCH_DTYPES[model.bnb_4bit_compute_dtype]
    return PRECISION_DTYPES[training.precision]


def load_base_model(model: ModelSection, training: TrainingSection, device: torch.device):
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if model.quantization != "none":
        kwargs["quantization_config"] = quantization_config(model, device)
        kwargs["device_map"] = {"": device.index or 0}
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model(model.name_or_path),
        revision=model.revision,
        dtype=weights_dtype(model, training),
        trust_remote_code=model.trust_remote_code,
        use_safetensors=True,
        **kwargs,
    )
    if model.quantization == "none":
        base.to(device)
    if model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=model.gradient_checkpointing)
    elif model.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    base.config.use_cache = False
    return base


def quantization_config(model: ModelSection, device: torch.device):
    require_bitsandbytes(model.quantization, device)
    from transformers import BitsAndBytesConfig

    if model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[model.bnb_4bit_compute_dtype],
    )


def require_bitsandbytes(mode: str, device: torch.device) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LorafleetError(
            f"model.quantization: {mode} needs bitsandbytes: pip install bitsandbytes (on a CUDA machine)"
        )
    if device.type != "cuda":
        raise LorafleetError(
            f"model.quantization: {mode} trains on CUDA GPUs only (this worker has {device.type}); "
            "set distributed.use_gpu: true on a GPU cluster, or model.quantization: none"
        )
