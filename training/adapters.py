"""Every PEFT method a job can name, mapped to its PEFT config in one table.

Target modules are checked against the model's real module names, so a typo lists what exists instead
of failing deep inside PEFT.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorafleet.adapter_config import (
    AdapterSection,
    DoraSection,
    Ia3Section,
    LoraSection,
    PrefixTuningSection,
    PromptTuningSection,
    PTuningSection,
)
from lorafleet.errors import LorafleetError


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the model's linear layers (q_proj, v_proj, ...), without the output head."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    try:
        import bitsandbytes as bnb

        names |= {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)
        }
    except ImportError:
        pass
    names.discard("lm_head")
    return sorted(names)


def resolve_target_modules(adapter: LoraSection | Ia3Section, model: torch.nn.Module) -> list[str]:
    available = linear_module_names(model)
    if adapter.target_modules == "all-linear":
        return available
    missing = [name for name in adapter.target_modules if name not in available]
    if missing:
        raise LorafleetError(
            f"adapter.target_modules: {', '.join(missing)} not found in the model; "
            f"its linear modules are: {', '.join(available)}"
        )
    return list(adapter.target_modules)


def _lora(adapter: LoraSection, model: torch.nn.Module):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=resolve_target_modules(adapter, model),
        use_dora=isinstance(adapter, DoraSection),
        use_rslora=adapter.use_rslora,
        layers_to_transform=top_layer_indices(adapter, model),
    )


def top_layer_indices(adapter: LoraSection, model: torch.nn.Module) -> list[int] | None:
    """The indices of the last `adapter.top_layers` decoder layers; None (every layer) when it is not set."""
    if adapter.top_layers is None:
        return None
    layers = getattr(model.config, "num_hidden_layers", None)
    if layers is None:
        raise LorafleetError("adapter.top_layers: the model's config has no num_hidden_layers to count from")
    if adapter.top_layers > layers:
        raise LorafleetError(f"adapter.top_layers: {adapter.top_layers} is more than the model's {layers} layers")
    return list(range(layers - adapter.top_layers, layers))


def _prefix_tuning(adapter: PrefixTuningSection, model: torch.nn.Module):
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=adapter.num_virtual_tokens)


def _p_tuning(adapter: PTuningSection, model: torch.nn.Module):
    from peft import PromptEncoderConfig, TaskType

    return PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=adapter.num_virtual_tokens,
        encoder_hidden_size=adapter.encoder_hidden_size or model.config.hidden_size,
    )


def _prompt_tuning(adapter: PromptTuningSection, model: torch.nn.Module):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    if adapter.prompt_init_text is None:
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=adapter.num_virtual_tokens)
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=adapter.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=adapter.prompt_init_text,
        tokenizer_name_or_path=model.name_or_path,
    )


def _ia3(adapter: Ia3Section, model: torch.nn.Module):
    from peft import IA3Config, TaskType

    targets = resolve_target_modules(adapter, model)
    feedforward = [name for name in targets if name in ("down_proj", "fc2", "c_proj", "w2")]
    return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=feedforward)


PEFT_CONFIG_BUILDERS: dict[str, Callable] = {
    "lora": _lora,
    "dora": _lora,
    "prefix_tuning": _prefix_tuning,
    "p_tuning": _p_tuning,
    "prompt_tuning": _prompt_tuning,
    "ia3": _ia3,
}


def apply_adapter(model: torch.nn.Module, adapter: AdapterSection):
    """The PEFT model; its trainable parameters are fp32 whatever the base's dtype (the optimizer's master
    weights: a bf16 base trains bf16 adapters otherwise, whose small updates round away)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, PEFT_CONFIG_BUILDERS[adapter.method](adapter, model))
    for parameter in peft_model.parameters():
        sharded = hasattr(parameter, "ds_id")  # ZeRO-3 owns its partitions' dtype
        if parameter.requires_grad and parameter.is_floating_point() and not sharded:
            parameter.data = parameter.data.float()
    return peft_model
