"""Helpers for tests and benchmarks: random adapters that change a model's outputs, made in a second.

    make_adapter(base_dir, tmp / "a", "lora", seed=1)        # LoRA with init_lora_weights=False
    make_adapter(base_dir, tmp / "p", "prefix", seed=2)      # prefix tuning with random virtual tokens

Each folder is a plain PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`) whose
`base_model_name_or_path` is `base_dir`, the way training writes it.
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_METHODS = ("lora", "lora-all", "dora", "prompt", "prefix", "ptuning")


def make_adapter(base_dir: str, out: str | Path, method: str = "lora", *, seed: int = 0, rank: int = 8) -> Path:
    import torch
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    configs = {
        "lora": lambda: LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
        "lora-all": lambda: LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False
        ),
        "dora": lambda: LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True
        ),
        "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "ptuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=32),
    }
    if method not in configs:
        raise ValueError(f"unknown adapter method {method!r}: one of {', '.join(ADAPTER_METHODS)}")
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), configs[method]())
    if method in ("prompt", "prefix", "ptuning"):
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter))
    model.save_pretrained(str(out))
    return Path(out)
