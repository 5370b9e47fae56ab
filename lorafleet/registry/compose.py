"""Weighted composition of published LoRA adapters into a new one (PEFT's `add_weighted_adapter`).

    lorafleet compose pricing@v3 support@prod --weights 0.7 0.3 --method linear --name pricing-support

The parents are loaded onto their common base (resolved with `lorafleet.models.resolve_model`), combined,
saved as a plain PEFT adapter, and published as a new version whose manifest lists its parents.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lorafleet.registry.contract import ServingProfile
from lorafleet.registry.layout import InvalidReference, RegistryError, validate_name
from lorafleet.registry.lookup import AdapterVersion, resolve
from lorafleet.registry.manifest import ADAPTER_CONFIG, TOKENIZER_FILES
from lorafleet.registry.publish import publish_adapter

# PEFT 0.21 LoraModel.add_weighted_adapter combination types.
COMBINATIONS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
NEEDS_DENSITY = tuple(c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude")))
COMPOSED = "composed"


def compose_adapters(
    storage_uri: str | Path | None,
    parents: list[str],
    weights: list[float],
    *,
    name: str,
    method: str = "linear",
    density: float | None = None,
    svd_rank: int | None = None,
    profile: ServingProfile | None = None,
    profile_source: str = "the target profile",
) -> AdapterVersion:
    """Combine `parents` (`name@version` references) with `weights` and publish the result as `name`."""
    validate_name(name)
    _check_arguments(parents, weights, method, density)
    sources = [resolve(storage_uri, reference) for reference in parents]
    base = _common_base(sources)

    import torch
    from peft import PeftModel

    from lorafleet.model_loading import load_base_model_weights
    from lorafleet.models import resolve_model

    base_path = resolve_model(base)
    model = load_base_model_weights(base_path, dtype=torch.float32)
    names = [f"parent{index}" for index in range(len(sources))]
    peft_model = PeftModel.from_pretrained(model, str(sources[0].path), adapter_name=names[0])
    for adapter_name, source in zip(names[1:], sources[1:], strict=True):
        peft_model.load_adapter(str(source.path), adapter_name=adapter_name)
    try:
        peft_model.add_weighted_adapter(
            names, list(weights), COMPOSED, combination_type=method, density=density, svd_rank=svd_rank
        )
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"PEFT cannot combine {', '.join(parents)} with {method}: {exc}") from None

    peft_model.peft_config[COMPOSED].base_model_name_or_path = base_path  # PEFT reads the base config on save
    with tempfile.TemporaryDirectory(prefix="lorafleet-compose-") as scratch:
        peft_model.save_pretrained(scratch, selected_adapters=[COMPOSED])
        out = Path(scratch) / COMPOSED  # PEFT saves a non-default adapter in a subfolder of its name
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = base  # what vLLM matches: the parents' base string, not a local path
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        for tokenizer_file in TOKENIZER_FILES:
            if (sources[0].path / tokenizer_file).is_file():
                shutil.copyfile(sources[0].path / tokenizer_file, out / tokenizer_file)
        composition = {"method": method, "weights": list(weights), "density": density, "svd_rank": svd_rank}
        return publish_adapter(
            storage_uri,
            name,
            out,
            profile=profile,
            profile_source=profile_source,
            parents=[source.reference for source in sources],
            composition=composition,
        )


def _check_arguments(parents: list[str], weights: list[float], method: str, density: float | None) -> None:
    if not parents:
        raise InvalidReference("name at least one adapter to compose")
    if len(weights) != len(parents):
        raise InvalidReference(f"{len(parents)} adapter(s) but {len(weights)} weight(s): give one weight per adapter")
    if method not in COMBINATIONS:
        raise InvalidReference(f"unknown --method {method!r}: one of {', '.join(COMBINATIONS)}")
    if method in NEEDS_DENSITY and density is None:
        raise InvalidReference(f"--method {method} needs --density (share of weights kept, 0 < density <= 1)")
    if density is not None and not 0 < density <= 1:
        raise InvalidReference(f"--density {density} must be in (0, 1]")


def _common_base(sources: list[AdapterVersion]) -> str:
    problems = []
    for source in sources:
        if source.manifest.peft_type != "LORA" or source.manifest.method == "dora":
            problems.append(f"{source.reference} is {source.manifest.method}: only plain LoRA adapters compose")
    bases = {source.manifest.base_model for source in sources}
    if len(bases) != 1 or None in bases:
        listed = ", ".join(f"{s.reference}: {s.manifest.base_model}" for s in sources)
        problems.append(f"the adapters must share one base model ({listed})")
    if problems:
        raise RegistryError("cannot compose: " + "; ".join(problems))
    return sources[0].manifest.base_model or ""
