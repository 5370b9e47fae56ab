"""The versioned adapter registry on shared storage: the hand-off between training and serving.

    lorafleet publish runs/pricing-20250101-120000 --name pricing     # → adapters/pricing/v1, latest → v1
    lorafleet registry list
    lorafleet registry show pricing@latest
    lorafleet promote pricing v1                                      # prod → v1, behind policy.yaml
    lorafleet rollback pricing
    lorafleet registry verify

Serving resolves a reference to an immutable folder it can load with plain PEFT or vLLM:

    from lorafleet.registry import resolve
    found = resolve(storage_uri, "pricing@prod")     # AdapterVersion(name, version, kind, path, manifest)
    PeftModel.from_pretrained(base, found.path)

Modules: `layout` (paths, names, references), `manifest` (manifest + fingerprints), `publish` (atomic
publish/unpublish), `aliases` (locked alias file + history), `lookup` (resolve, list), `policy` + `promote`
(gate, promote, rollback), `verify`, `contract` (serving profile checks), `compose` (weighted composition).
"""

from lorafleet.registry.aliases import AliasEvent, AliasFile, read_aliases
from lorafleet.registry.compose import COMBINATIONS, compose_adapters
from lorafleet.registry.contract import (
    VLLM_LORA_RANKS,
    ContractViolation,
    ServingProfile,
    check_adapter_against_profile,
    load_profile,
)
from lorafleet.registry.layout import (
    LATEST,
    InvalidReference,
    NotFound,
    Reference,
    Registry,
    RegistryError,
    parse_reference,
    validate_alias,
    validate_name,
)
from lorafleet.registry.lookup import AdapterVersion, EntrySummary, list_entries, resolve, resolve_version
from lorafleet.registry.manifest import Manifest, base_fingerprint, read_manifest, tokenizer_fingerprint
from lorafleet.registry.policy import PromotionPolicy, load_policy, set_policy
from lorafleet.registry.promote import AliasMove, PromotionRefused, promote, rollback
from lorafleet.registry.publish import publish_adapter, publish_merged, publish_run, unpublish
from lorafleet.registry.verify import (
    TamperedVersion,
    VerifyProblem,
    VerifyReport,
    check_version,
    require_intact,
    verify,
)

__all__ = [
    "COMBINATIONS",
    "LATEST",
    "VLLM_LORA_RANKS",
    "AdapterVersion",
    "AliasEvent",
    "AliasFile",
    "AliasMove",
    "ContractViolation",
    "EntrySummary",
    "InvalidReference",
    "Manifest",
    "NotFound",
    "PromotionPolicy",
    "PromotionRefused",
    "Reference",
    "Registry",
    "RegistryError",
    "ServingProfile",
    "TamperedVersion",
    "VerifyProblem",
    "VerifyReport",
    "base_fingerprint",
    "check_adapter_against_profile",
    "check_version",
    "compose_adapters",
    "list_entries",
    "load_policy",
    "load_profile",
    "parse_reference",
    "promote",
    "publish_adapter",
    "publish_merged",
    "publish_run",
    "read_aliases",
    "read_manifest",
    "require_intact",
    "resolve",
    "resolve_version",
    "rollback",
    "set_policy",
    "tokenizer_fingerprint",
    "unpublish",
    "validate_alias",
    "validate_name",
    "verify",
]
