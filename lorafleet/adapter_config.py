"""The `adapter:` section: one typed section per PEFT method, chosen by `method` (PEFT has one config per tuner).

A knob of another method is an unknown key here (`method: prompt_tuning` with `r: 64` is refused, naming the
method and the knob), so each section lists exactly what its method reads. `method` defaults to `lora`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Discriminator, Field, Tag, field_validator

from lorafleet.schema import Section

PROMPT_LEARNING_METHODS = ("prefix_tuning", "p_tuning", "prompt_tuning")
DEFAULT_METHOD = "lora"

def _non_empty_targets(value: str | list[str]) -> str | list[str]:
    if isinstance(value, list) and not value:
        raise ValueError("must name at least one module, or be `all-linear`")
    return value


TargetModules = Annotated[
    Literal["all-linear"] | list[str],
    AfterValidator(_non_empty_targets),
    Field(description="`all-linear` or a list of module names (e.g. [q_proj, v_proj])."),
]


class LoraSection(Section):
    """LoRA: low-rank updates B·A added to the target linear layers."""

    method: Literal["lora"] = Field("lora", description="PEFT method.")
    r: int = Field(8, gt=0, description="Rank: higher = more capacity, more memory.")
    alpha: float = Field(16, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: TargetModules = "all-linear"
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) (steadier at high rank).")
    top_layers: int | None = Field(
        None,
        gt=0,
        description="Adapt only the last N decoder layers (default: all). Backward stops below the lowest "
        "adapted layer, so a step costs less (the last third: ~1.8x the tokens/s on CPU).",
    )


class DoraSection(LoraSection):
    """DoRA: LoRA on the direction of each weight, with a learned magnitude per output."""

    method: Literal["dora"] = Field("dora", description="PEFT method.")


class Ia3Section(Section):
    """IA3: learned scaling vectors on the target layers' activations."""

    method: Literal["ia3"] = Field("ia3", description="PEFT method.")
    target_modules: TargetModules = "all-linear"


class PrefixTuningSection(Section):
    """Prefix tuning: learned key/value prefixes in every attention layer."""

    method: Literal["prefix_tuning"] = Field("prefix_tuning", description="PEFT method.")
    num_virtual_tokens: int = Field(16, gt=0, description="Virtual tokens of the prefix.")


class PTuningSection(Section):
    """P-tuning: virtual token embeddings produced by a small prompt encoder."""

    method: Literal["p_tuning"] = Field("p_tuning", description="PEFT method.")
    num_virtual_tokens: int = Field(16, gt=0, description="Virtual tokens of the prompt.")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Hidden size of the prompt encoder MLP (default: the model's)."
    )


class PromptTuningSection(Section):
    """Prompt tuning: learned virtual token embeddings before the input."""

    method: Literal["prompt_tuning"] = Field("prompt_tuning", description="PEFT method.")
    num_virtual_tokens: int = Field(16, gt=0, description="Virtual tokens of the prompt.")
    prompt_init_text: str | None = Field(
        None, description="Initialise the virtual tokens from this text's embeddings (else random)."
    )

    @field_validator("prompt_init_text")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank (leave it out for random initialisation)")
        return value


METHOD_SECTIONS: dict[str, type[Section]] = {
    "lora": LoraSection,
    "dora": DoraSection,
    "ia3": Ia3Section,
    "prefix_tuning": PrefixTuningSection,
    "p_tuning": PTuningSection,
    "prompt_tuning": PromptTuningSection,
}


def method_of(value: Any) -> str:
    """The tag that picks the section: `method` of a mapping (lora when absent) or of a built section."""
    if isinstance(value, dict):
        method = value.get("method", DEFAULT_METHOD)
        return method if isinstance(method, str) else repr(method)
    return getattr(value, "method", DEFAULT_METHOD)


def describe_adapter(adapter: Section) -> str:
    """`lora r=16`, `prompt_tuning 16 virtual tokens`: the method and its size, for one-line summaries."""
    if isinstance(adapter, LoraSection):
        return f"{adapter.method} r={adapter.r}"
    tokens = getattr(adapter, "num_virtual_tokens", None)
    return f"{adapter.method} {tokens} virtual tokens" if tokens else adapter.method


def knobs_of(method: str) -> list[str]:
    section = METHOD_SECTIONS.get(method)
    return [name for name in section.model_fields if name != "method"] if section else []


def adapter_knob_message(key: str, method: str) -> str:
    """Why `key` is refused under `method`: a knob of other methods, or no knob at all."""
    owners = [other for other in METHOD_SECTIONS if key in knobs_of(other)]
    knobs = ", ".join(knobs_of(method))
    if owners:
        return f"{key} does not apply to method: {method} (it is a knob of {', '.join(owners)}; {method} takes {knobs})"
    return f"unknown key (check the spelling; method: {method} takes {knobs})"


AdapterSection = Annotated[
    Annotated[LoraSection, Tag("lora")]
    | Annotated[DoraSection, Tag("dora")]
    | Annotated[Ia3Section, Tag("ia3")]
    | Annotated[PrefixTuningSection, Tag("prefix_tuning")]
    | Annotated[PTuningSection, Tag("p_tuning")]
    | Annotated[PromptTuningSection, Tag("prompt_tuning")],
    Discriminator(
        method_of,
        custom_error_type="unknown_adapter_method",
        custom_error_message=f"method must be one of {', '.join(METHOD_SECTIONS)}",
    ),
]


def yaml_keys(loc: tuple) -> tuple[list[str], str | None]:
    """The YAML key path of a job config validation error, and the adapter method whose knobs it is about."""
    keys = [str(part) for part in loc]
    if keys[:1] == ["adapter"] and len(keys) > 1 and knobs_of(keys[1]):
        return keys[:1] + keys[2:], keys[1]  # the tag of the adapter section pydantic chose: not a key of the YAML
    return keys, None
