"""Which adapter folders the server may load, and what kind of adapter each is.

Checks, in order, each refusing with a message that says what to do:
1. the name: `[a-z0-9][a-z0-9._-]{0,62}`, no '..' (names are model ids), not the base model's id;
2. the folder: its real path (symlinks followed) lies inside one of the allowed roots (no traversal);
3. a registry version (it has a manifest.json) still matches its manifest, file by file (hashes cached);
4. the contract with the served base (`lorafleet.registry.check_adapter_against_profile`, the same rules the
   registry applies at publish time): `base_model_name_or_path` names the served base (the reference string, or
   the same resolved folder), rank <= max_lora_rank, the method is one the CPU engine serves.

Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) are read here into constant tensors: at
inference their virtual tokens do not depend on the input, so the engine prepends them per sequence and these
sequences share batches with LoRA ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lorafleet.errors import LorafleetError
from lorafleet.serving.config import ServingConfig, check_adapter_name

AdapterKind = Literal["lora", "dora", "prompt", "prefix"]
# How the engine applies each PEFT type it serves (which types: `lorafleet.registry.contract.CPU_PEFT_TYPES`).
ADAPTER_KINDS = {"LORA": "lora", "PROMPT_TUNING": "prompt", "P_TUNING": "prompt", "PREFIX_TUNING": "prefix"}


class AdapterError(LorafleetError):
    """An adapter cannot be loaded (bad name, path outside the roots, wrong base, unsupported method)."""

    exit_code = 2
    status = 400
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass(frozen=True)
class AdapterSpec:
    """A validated adapter folder, ready for the engine to load."""

    name: str
    path: Path
    kind: AdapterKind
    config: dict = field(repr=False)

    @property
    def rank(self) -> int | None:
        return self.config.get("r") if self.kind in ("lora", "dora") else None


def validate_name(name: str, config: ServingConfig) -> str:
    try:
        check_adapter_name(name)
    except ValueError as exc:
        raise AdapterError(str(exc), param="lora_name") from None
    if name == config.model_id:
        raise AdapterError(f"the adapter name {name!r} conflicts with the served base model", param="lora_name")
    return name


def inside_roots(path: str | Path, roots: list[Path]) -> Path:
    """The real path of `path` if it lies inside one of `roots`, else AdapterError."""
    real = Path(path).expanduser().resolve()
    if not any(real == root or real.is_relative_to(root) for root in roots):
        shown = ", ".join(str(root) for root in roots) or "(none configured)"
        raise AdapterError(
            f"adapter path {path} is outside the allowed adapter roots ({shown}); "
            "put it under one of them or start the server with --adapter-root",
            param="lora_path",
        )
    return real


def inspect_adapter(name: str, path: str | Path, config: ServingConfig) -> AdapterSpec:
    """Run every check on `name` + `path` and say what kind of adapter it is."""
    from lorafleet.registry import RegistryError, ServingProfile, check_adapter_against_profile, require_intact
    from lorafleet.registry.checks import load_adapter_config
    from lorafleet.registry.contract import CPU_PEFT_TYPES
    from lorafleet.registry.manifest import MANIFEST

    validate_name(name, config)
    folder = inside_roots(path, config.effective_adapter_roots())
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist", param="lora_path", status=404)
    if (folder / MANIFEST).is_file():  # a registry version: used only while it matches its manifest
        try:
            require_intact(folder)
        except RegistryError as exc:
            raise AdapterError(str(exc), param="lora_path") from None
    for entry in folder.iterdir():  # every file read must be inside the folder, not a link to anywhere else
        real = entry.resolve()
        if entry.is_symlink() and not real.is_relative_to(folder):
            raise AdapterError(f"{entry} is a link to {real}, outside the adapter folder: refused", param="lora_path")
        if real.exists() and not (real.is_file() or real.is_dir()):  # a FIFO would block its reader forever
            raise AdapterError(f"{entry} is not a regular file (a FIFO, socket or device): refused", param="lora_path")
    try:
        adapter_config = load_adapter_config(folder)
    except RegistryError as exc:
        raise AdapterError(str(exc), param="lora_path") from None
    peft_type = adapter_config["peft_type"].upper()
    if peft_type not in CPU_PEFT_TYPES:
        raise AdapterError(
            f"adapter {name!r} is {peft_type}: the CPU engine serves {', '.join(CPU_PEFT_TYPES)}", param="lora_path"
        )
    kind: AdapterKind = ADAPTER_KINDS[peft_type]  # type: ignore[assignment]
    if kind == "lora" and adapter_config.get("use_dora"):
        kind = "dora"
    if kind in ("prompt", "prefix") and adapter_config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"adapter {name!r} is for task {adapter_config.get('task_type')}, not CAUSAL_LM")
    profile = ServingProfile(base_model=config.base, engine="cpu", max_lora_rank=config.max_lora_rank)
    reasons = check_adapter_against_profile(folder, profile)
    if reasons:
        raise AdapterError(
            f"adapter {name!r} ({folder}) cannot be served by this server: " + "; ".join(reasons), param="lora_path"
        )
    return AdapterSpec(name=name, path=folder, kind=kind, config=adapter_config)


@dataclass
class VirtualTokens:
    """The constant part a prompt-learning adapter adds to every sequence."""

    count: int
    embeds: object | None = None  # torch.Tensor [count, hidden] (prompt tuning, P-tuning)
    prefix: list[tuple[object, object]] | None = None  # per layer (keys, values) [kv_heads, count, head_dim]


def read_virtual_tokens(spec: AdapterSpec, model_config, dtype) -> VirtualTokens:
    """Prompt embeddings or prefix keys/values, exactly as PEFT's `get_prompt` builds them in inference mode."""
    from safetensors.torch import load_file

    weights_file = spec.path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AdapterError(f"{weights_file} is missing", param="lora_path")
    weights = load_file(str(weights_file))
    if "prompt_embeddings" not in weights:
        raise AdapterError(f"{weights_file} has no prompt_embeddings tensor", param="lora_path")
    table = weights["prompt_embeddings"].to(dtype)
    cfg = spec.config
    count = int(cfg["num_virtual_tokens"])
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise AdapterError(f"adapter {spec.name!r} is for an encoder-decoder model")
    if spec.kind == "prompt":
        if tuple(table.shape) != (count, model_config.hidden_size):
            raise AdapterError(
                f"adapter {spec.name!r}: prompt embeddings of shape {tuple(table.shape)} do not fit this base "
                f"({count} x {model_config.hidden_size} expected)"
            )
        return VirtualTokens(count=count, embeds=table)
    layers, heads = int(cfg["num_layers"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg["token_dim"]) // heads
    expected_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    model_head_dim = (
        getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    )
    if layers != model_config.num_hidden_layers or heads != expected_heads or head_dim != model_head_dim:
        raise AdapterError(
            f"adapter {spec.name!r}: prefix for {layers} layers x {heads} heads x {head_dim} does not fit this base "
            f"({model_config.num_hidden_layers} x {expected_heads} x {model_head_dim})"
        )
    past = table.view(count, layers * 2, heads, head_dim).permute(1, 2, 0, 3)  # [2*layers, heads, count, dim]
    return VirtualTokens(count=count, prefix=[(past[2 * i], past[2 * i + 1]) for i in range(layers)])
