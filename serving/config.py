"""The serving config: one typed object for both engines (CPU engine here, vLLM on GPUs).

    lorafleet serve --config serve.yaml --port 9000        # flags override the YAML

    # serve.yaml
    engine: cpu
    base: builtin:smollm2-135m-instruct
    adapters: {pricing: /storage/adapters/pricing/v3}
    max_loras: 4

Unknown keys are errors (`extra="forbid"`). The limits mirror vLLM's flags so a deployment behaves the same on
either engine: `max_lora_rank` takes vLLM's choices, `max_cpu_loras >= max_loras`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafleet.errors import ConfigError, LorafleetError, Problem
from lorafleet.names import NAME_RULE, is_valid_name
from lorafleet.object_store import is_s3_uri
from lorafleet.paths import default_storage_uri
from lorafleet.registry.contract import VLLM_LORA_RANKS  # vLLM 0.33 LoRAConfig.max_lora_rank choices
from lorafleet.storage import local_path_of
from lorafleet.yamlsource import validation_problems

# The CPU engine keeps every loaded adapter in memory; without max_cpu_loras it holds at most this many.
DEFAULT_CPU_ADAPTER_LIMIT = 64


def check_adapter_name(name: str) -> str:
    """Adapter names become model ids (and folder names in the registry): no paths, no uppercase."""
    if not is_valid_name(name):
        raise ValueError(f"invalid adapter name {name!r}: use {NAME_RULE}")
    return name


class ServingConfig(BaseModel):
    """Everything `lorafleet serve` needs; CLI flags override the YAML's values."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    engine: Literal["cpu", "vllm"] = Field("cpu", description="`cpu`: transformers + PEFT here; `vllm`: exec vLLM.")
    base: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Base model: `builtin:<name>`, a local HF folder, a hub id, or `registry:NAME[@VER]` (merged).",
    )
    served_model_name: str | None = Field(
        None, description="The base model's id in the API (/v1/models, `model`); default: `base` as given."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Adapters loaded at start: NAME -> folder (`--adapter NAME=PATH`)."
    )
    registry_adapters: list[str] = Field(
        default_factory=list,
        description="Registry references loaded at start (`--adapters NAME[@ALIAS],...`), resolved in `storage`.",
    )
    storage: str | None = Field(None, description="Shared storage root holding the registry (default: local cache).")
    adapter_roots: list[str] = Field(
        default_factory=list,
        description="Folders adapters may be loaded from; default: the storage root and the startup adapters' dirs.",
    )
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    api_key: str | None = Field(
        None, description="Require `Authorization: Bearer <key>` on every route but /health (env LORAFLEET_API_KEY)."
    )
    runtime_lora_updating: bool = Field(
        True, description="Offer /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM: runtime LoRA updating)."
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Sequences decoded together (higher: throughput); default: as many as their KV cache at "
        "max_model_len fits in half the memory available, at most 64 (printed at start).",
    )
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="When idle, wait this long for more requests to fill the first batch."
    )
    max_queue: int = Field(64, ge=1, description="Requests waiting beyond the running batch; more get 429.")
    max_loras: int = Field(4, ge=1, description="Distinct adapters in one running batch (vLLM --max-loras).")
    max_lora_rank: int = Field(16, description=f"Highest adapter rank accepted, one of {VLLM_LORA_RANKS}.")
    max_cpu_loras: int | None = Field(
        None,
        ge=1,
        description="vLLM: adapters cached in CPU memory (>= max_loras). CPU engine: adapters loaded at most "
        f"(default {DEFAULT_CPU_ADAPTER_LIMIT}).",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length (prompt + completion); default: the model's own limit."
    )
    max_tokens: int = Field(512, ge=1, description="Most tokens one request may generate (its max_tokens cap).")
    max_n: int = Field(
        16, ge=1, le=128, description="Most choices (`n`) one request may ask; each takes a batch slot (400 above)."
    )
    max_request_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted (413 above).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights' dtype (`auto`: on the CPU engine bfloat16 where the CPU multiplies bf16 natively, "
        "else float32, printed at start; on vLLM the model's dtype).",
    )
    quantization: Literal["none", "int8", "int4"] | None = Field(
        None,
        description="CPU engine: base weights quantized at load (int8 matmuls; LoRA stays full precision on top). "
        "Default: a quantized folder (`lorafleet quantize`) as its method says, else none. vLLM: serves quantized "
        "folders as their config.json says (`--quantization compressed-tensors`); int8/int4 need such a folder.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU engine: intra-op threads of the model thread (default: torch's, one per core)."
    )
    packed_weights: bool = Field(
        True,
        description="CPU engine, float32 or bfloat16: the base model's linear weights also kept in oneDNN's blocked "
        "layout (~1.5-3x faster matmuls at decode batch sizes, for a second copy of those weights in memory).",
    )
    prefix_cache_mb: float = Field(
        256,
        ge=0,
        description="CPU engine: KV of prompt prefixes kept for later prompts that start the same way under the "
        "same adapter version (0: off).",
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="On shutdown, how long in-flight requests may finish.")
    request_body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="A client must send its whole request body within this (408 otherwise)."
    )
    max_connections: int = Field(
        1024, ge=1, description="Open connections and requests in progress; past this, 503 (slow clients are bounded)."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    vllm_python: str | None = Field(
        None,
        description="vLLM: the Python of a vLLM install (default: $LORAFLEET_VLLM_PYTHON, then `vllm` on PATH, then "
        "the .venv-vllm that `make vllm` makes beside this venv).",
    )
    vllm_args: list[str] = Field(
        default_factory=list, description="Extra vLLM flags appended verbatim after the rendered ones."
    )

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(
                "an empty API key would turn authentication off: give a key, or leave --api-key (and "
                "LORAFLEET_API_KEY) out to serve without one"
            )
        return value

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            check_adapter_name(name)
            if not str(path).strip():
                raise ValueError(f"adapter {name!r} has an empty path")
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"{value} is not a rank vLLM accepts: one of {', '.join(map(str, VLLM_LORA_RANKS))}")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ServingConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}), as vLLM requires"
            )
        clash = set(self.adapters) & {self.model_id}
        if clash:
            raise ValueError(f"adapter name {clash.pop()!r} is also the base model's id: rename the adapter")
        return self

    @property
    def model_id(self) -> str:
        """The base model's id in the API."""
        return self.served_model_name or self.base

    @property
    def storage_uri(self) -> str:
        return self.storage or default_storage_uri()

    @property
    def cpu_adapter_limit(self) -> int:
        return self.max_cpu_loras or DEFAULT_CPU_ADAPTER_LIMIT

    def effective_adapter_roots(self) -> list[Path]:
        """Folders an adapter's real path must lie in: the configured roots, else storage + startup dirs."""
        if self.adapter_roots:
            roots = [Path(root) for root in self.adapter_roots]
        else:
            roots = [Path(path).parent for path in self.adapters.values()]
            local_storage = local_path_of(self.storage_uri)
            if local_storage is None and is_s3_uri(self.storage_uri):
                from lorafleet.registry.remote import mirror_of

                local_storage = mirror_of(self.storage_uri)  # registry versions are loaded from its mirror
            if local_storage is not None:
                roots.append(local_storage)
        unique: list[Path] = []
        for root in roots:
            resolved = root.expanduser().resolve()
            if resolved not in unique:
                unique.append(resolved)
        return unique


def build_serving_config(yaml_path: Path | None, overrides: dict[str, Any]) -> ServingConfig:
    """The YAML's values (if any) with `overrides` (flags that were given) on top; every problem at once."""
    data: dict[str, Any] = {}
    source_name = str(yaml_path) if yaml_path else "command line"
    source = None
    if yaml_path is not None:
        from lorafleet.yamlsource import YamlSource

        source = YamlSource.read(Path(yaml_path))
        if not isinstance(source.data, dict):
            raise ConfigError(source_name, [Problem(source_name, "the top level must be a mapping")])
        data = dict(source.data)
    for key, value in overrides.items():
        if key == "adapters" and value:
            data["adapters"] = {**(data.get("adapters") or {}), **value}
        elif key in ("adapter_roots", "registry_adapters", "vllm_args") and value:
            data[key] = [*(data.get(key) or []), *value]
        elif value is not None and value != [] and value != {}:
            data[key] = value
    try:
        return ServingConfig.model_validate(data)
    except ValidationError as exc:
        where = None if source else (lambda keys: f"{source_name} {'.'.join(keys) or '(top level)'}")
        raise ConfigError(source_name, validation_problems(exc, source, where=where)) from None


REGISTRY_BASE_PREFIX = "registry:"


def with_registry_base(config: ServingConfig) -> ServingConfig:
    """`base: registry:NAME[@vN|@ALIAS]`: a merged model published with `lorafleet publish --merged`, served from
    its immutable `<storage>/models/NAME/vN/` folder under the id NAME (unless `served_model_name` says otherwise)."""
    if not config.base.startswith(REGISTRY_BASE_PREFIX):
        return config
    from lorafleet.registry import resolve

    reference = config.base.removeprefix(REGISTRY_BASE_PREFIX)
    try:
        found = resolve(config.storage_uri, reference, kind="models")
    except LorafleetError as exc:
        raise ConfigError(f"registry {config.storage_uri}", [Problem(f"base {config.base}", str(exc))]) from None
    return config.model_copy(
        update={"base": str(found.path), "served_model_name": config.served_model_name or found.name}
    )


def with_registry_adapters(config: ServingConfig) -> ServingConfig:
    """`registry_adapters` (`NAME`, `NAME@v3`, `NAME@prod`) resolved in `storage` and added to `adapters`.

    Each is served under its registry name; the folder is the immutable version the reference names now.
    """
    if not config.registry_adapters:
        return config
    from lorafleet.registry import resolve

    adapters = dict(config.adapters)
    problems: list[Problem] = []
    bases: dict[str | None, list[str]] = {}
    for reference in config.registry_adapters:
        try:
            found = resolve(config.storage_uri, reference)
        except LorafleetError as exc:
            problems.append(Problem(f"adapters {reference}", str(exc)))
            continue
        if found.name in adapters:
            problems.append(Problem(f"adapters {reference}", f"{found.name!r} is also given with --adapter"))
            continue
        adapters[found.name] = str(found.path)
        bases.setdefault(found.manifest.base_model, []).append(reference)
    update: dict[str, Any] = {"adapters": adapters, "registry_adapters": []}
    if "base" not in config.model_fields_set and not problems:
        update["base"] = _base_all_agree_on(bases, problems)
    if problems:
        raise ConfigError(f"registry {config.storage_uri}", problems)
    return config.model_copy(update=update)


def _base_all_agree_on(bases: dict[str | None, list[str]], problems: list[Problem]) -> str | None:
    """Without `--base`, the one base model the registry adapters' manifests name."""
    named = {base: references for base, references in bases.items() if base}
    if len(named) == 1 and None not in bases:
        return next(iter(named))
    if len(named) > 1:
        listed = "; ".join(f"{base} ({', '.join(refs)})" for base, refs in named.items())
        message = f"the adapters were trained on different bases: {listed}"
    else:
        message = f"no base model in the manifests of {', '.join(bases.get(None, []))}"
    problems.append(Problem("--adapters", f"{message}; give --base"))
    return None
