"""The training-to-serving contract: refuse at publish time what the target server would reject at load time.

    lorafleet publish RUN --name pricing --target configs/serving/vllm-llama8b.yaml

A serving profile (YAML) says which base the server runs and what its engine accepts. Serving calls
`check_adapter_against_profile` again before loading, so both sides apply the same rules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from lorafleet.quantization.checkpoint import quantized_from
from lorafleet.registry.checks import adapter_weights_problems, load_adapter_config, safetensors_names
from lorafleet.registry.layout import RegistryError
from lorafleet.registry.manifest import (
    ADAPTER_WEIGHTS,
    MANIFEST,
    adapter_facts,
    local_base_folder,
    tokenizer_fingerprint,
)
from lorafleet.registry.yamlfile import load_yaml_model

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# The one owner of which PEFT types each engine serves (publish --target and the servers' loads both ask here):
# the CPU engine stacks LoRA/DoRA and prepends virtual tokens; IA3 rescales activations, which it does not do.
CPU_PEFT_TYPES = ("LORA", "PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING")
VLLM_PEFT_TYPES = ("LORA",)
EMBEDDING_TENSOR = re.compile(
    r"(embed_tokens|embed_in|embed_out|\bwte\b|word_embeddings|lm_head|lora_embedding_[AB]|modules_to_save|trainable_tokens)"
)


class ContractViolation(RegistryError):
    """The adapter would be rejected by the target server; carries every reason."""

    def __init__(self, subject: str, target: str, reasons: list[str]):
        self.reasons = reasons
        lines = [f"{subject} cannot be served by {target}: {len(reasons)} problem(s)"]
        super().__init__("\n".join(lines + [f"  - {reason}" for reason in reasons]))


class ServingProfile(BaseModel):
    """What one serving deployment runs and accepts."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="The served base, exactly as adapters' base_model_name_or_path must say.")
    base_model_revision: str | None = Field(None, description="Hub revision of the base, if pinned.")
    engine: Literal["vllm", "cpu"] = "vllm"
    max_lora_rank: int | None = Field(
        None, gt=0, description=f"vLLM --max-lora-rank (one of {VLLM_LORA_RANKS}; default 16); CPU: no limit."
    )
    supported_target_modules: list[str] | None = Field(None, description="Modules the server can apply LoRA to.")
    tokenizer_hash: str | None = Field(
        None, description="`lorafleet registry fingerprint BASE` of the served tokenizer."
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank_values(cls, value: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("engine", "vllm") == "vllm" and value is not None and value not in VLLM_LORA_RANKS:
            raise ValueError(f"{value} is not a max_lora_rank vLLM accepts: {', '.join(map(str, VLLM_LORA_RANKS))}")
        return value

    @property
    def rank_limit(self) -> int | None:
        if self.max_lora_rank is not None:
            return self.max_lora_rank
        return VLLM_DEFAULT_MAX_LORA_RANK if self.engine == "vllm" else None


def load_profile(path: Path | str) -> ServingProfile:
    """Read a serving profile YAML (ConfigError with file:line for every bad key)."""
    return load_yaml_model(Path(path), ServingProfile)


def check_adapter_against_profile(adapter_dir: Path | str, profile: ServingProfile) -> list[str]:
    """Every reason the server described by `profile` would refuse the adapter in `adapter_dir` ([] = fine)."""
    folder = Path(adapter_dir)
    try:
        config = load_adapter_config(folder)
    except RegistryError as exc:
        return [str(exc)]
    facts = adapter_facts(config)
    manifest = _manifest_beside(folder)
    vllm = profile.engine == "vllm"
    reasons = _method_reasons(facts, vllm)
    reasons += _base_reasons(facts, manifest, profile)

    rank, limit = facts["rank"], profile.rank_limit
    if rank is not None and limit is not None and rank > limit:
        reasons.append(
            f"rank r={rank} is above the server's max_lora_rank {limit}: retrain with adapter.r <= {limit}, "
            "or raise the server's max_lora_rank"
        )
    if vllm and facts["modules_to_save"]:
        reasons.append(
            f"adapter_config.json sets modules_to_save {facts['modules_to_save']}: vLLM loads only LoRA A/B "
            "weights; train without modules_to_save"
        )
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        reasons.append(f"{ADAPTER_WEIGHTS} is missing (vLLM and the registry need safetensors weights)")
    elif weights_problems := adapter_weights_problems(weights, facts["peft_type"]):
        reasons += weights_problems
    elif vllm:
        embedded = [name for name in safetensors_names(weights) if EMBEDDING_TENSOR.search(name)]
        if embedded:
            shown = ", ".join(embedded[:4]) + (f" (+{len(embedded) - 4} more)" if len(embedded) > 4 else "")
            reasons.append(
                f"{ADAPTER_WEIGHTS} holds embedding/lm_head weights ({shown}): vLLM cannot load them; "
                "train without embedding, lm_head or modules_to_save targets"
            )
    reasons += _target_reasons(facts["target_modules"], profile.supported_target_modules)
    if profile.tokenizer_hash:
        found = tokenizer_fingerprint(folder) or (manifest or {}).get("tokenizer_fingerprint")
        if found is None:
            reasons.append("the server pins tokenizer_hash but the adapter has no tokenizer files or fingerprint")
        elif found != profile.tokenizer_hash:
            reasons.append(
                f"tokenizer fingerprint {found[:12]}… differs from the server's tokenizer_hash "
                f"{profile.tokenizer_hash[:12]}… (different tokenizer or chat template)"
            )
    return reasons


def _manifest_beside(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _method_reasons(facts: dict, vllm: bool) -> list[str]:
    peft_type, method = facts["peft_type"], facts["method"]
    if vllm and peft_type not in VLLM_PEFT_TYPES:
        return [f"method {method or 'unknown'} cannot be served by vLLM, which serves LoRA adapters only"]
    if vllm and method == "dora":
        return ["DoRA (use_dora: true) cannot be served by vLLM: retrain with adapter.method: lora"]
    if not vllm and peft_type not in CPU_PEFT_TYPES:
        return [f"method {method or 'unknown'} is not one the CPU engine loads ({', '.join(CPU_PEFT_TYPES)})"]
    return []


def _base_reasons(facts: dict, manifest: dict | None, profile: ServingProfile) -> list[str]:
    base = facts["base_model"]
    reasons = []
    same = base == profile.base_model
    if not same and profile.engine == "cpu" and base:
        # The CPU engine loads by folder, so `builtin:x` and the folder it resolves to are the same base.
        # A `lorafleet quantize` folder of a base serves that base's adapters (in full precision on top).
        left, right = local_base_folder(base), local_base_folder(profile.base_model)
        same = left is not None and left in (right, local_base_folder(quantized_from(right)))
    if not same:
        reasons.append(
            f"base model {base!r} differs from the server's {profile.base_model!r}: the adapter's "
            "base_model_name_or_path must name the served base exactly (vLLM refuses anything else)"
        )
    revision = facts["base_model_revision"] or (manifest or {}).get("base_model_revision")
    if profile.base_model_revision and revision and revision != profile.base_model_revision:
        reasons.append(f"base revision {revision!r} differs from the server's {profile.base_model_revision!r}")
    return reasons


def _target_reasons(targets: list[str] | str | None, supported: list[str] | None) -> list[str]:
    if supported is None or targets is None:
        return []
    if isinstance(targets, str):
        return [f"target_modules is the pattern {targets!r}: list module names so they can be checked"]
    unsupported = sorted(set(targets) - set(supported))
    if unsupported:
        return [f"target modules {unsupported} are not among the server's supported_target_modules {supported}"]
    return []
