"""`lorafleet registry ...` plus the top-level `publish`, `promote`, `rollback`, `compose` commands.

    lorafleet publish pricing-20250101-120000 --name pricing [--target serving-profile.yaml] [--merged]
    lorafleet registry list | show pricing@prod | verify [pricing] | resolve pricing@prod
    lorafleet registry policy pricing --set thresholds.mae.max=20
    lorafleet promote pricing v3 [--alias prod] [--force --reason TEXT]
    lorafleet rollback pricing [--alias prod]
    lorafleet compose pricing@v3 support@v1 --weights 0.7 0.3 --method linear --name blend

Exit codes: 0 ok, 1 refused or failed (contract, gate, verify, not found), 2 bad input (names, files).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

app = typer.Typer(help="The versioned adapter registry on shared storage.", no_args_is_help=True)

StorageOption = typer.Option(
    None, "--storage", help="Storage root (path, file:// or s3://). Default: $LORAFLEET_STORAGE, else the local cache."
)
MergedOption = typer.Option(False, "--merged", help="Merged full models (models/) instead of adapters.")
TargetOption = typer.Option(
    None, "--target", dir_okay=False, help="Serving profile YAML: refuse what that server would reject."
)
FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _storage(storage: str | None) -> str:
    from lorafleet.paths import default_storage_uri

    return storage or default_storage_uri()


def _kind(merged: bool) -> str:
    return "models" if merged else "adapters"


def _profile(target: Path | None):
    from lorafleet.registry import load_profile

    return load_profile(target) if target else None


def publish(
    run: str = typer.Argument(..., help="A run folder, a run id under <storage>/runs/, or an adapter folder."),
    name: str = typer.Option(..., "--name", help="Registry name: [a-z0-9][a-z0-9._-]{0,62}."),
    merged: bool = typer.Option(False, "--merged", help="Publish the run's merged/ model (or RUN as a model folder)."),
    storage: str = StorageOption,
    target: Path = TargetOption,
) -> None:
    """Publish a run's adapter as the next version of NAME (atomic; `latest` moves to it)."""
    from lorafleet.registry import publish_run

    published = publish_run(
        _storage(storage), run, name=name, merged=merged, profile=_profile(target), profile_source=str(target)
    )
    typer.echo(f"published {published.kind}/{published.reference}\n{published.path}")


def promote(
    name: str = typer.Argument(..., help="Registry name (or NAME@VERSION)."),
    version: str = typer.Argument(None, help="Version (v3) or alias (latest) to promote."),
    alias: str = typer.Option("prod", "--alias", help="Alias to move."),
    force: bool = typer.Option(False, "--force", help="Promote even if the gate fails (needs --reason)."),
    reason: str = typer.Option(None, "--reason", help="Why; recorded in the alias history."),
    merged: bool = MergedOption,
    storage: str = StorageOption,
) -> None:
    """Move ALIAS to VERSION if its eval metrics pass the name's policy.yaml (or --force --reason)."""
    from lorafleet.registry import InvalidReference
    from lorafleet.registry import promote as promote_alias

    if version is None and "@" not in name:
        raise InvalidReference("say which version to promote: `lorafleet promote NAME v3` or NAME@v3")
    moved = promote_alias(
        _storage(storage), name, version or "", alias=alias, force=force, reason=reason, kind=_kind(merged)
    )
    if moved.previous == moved.version and not moved.forced:
        typer.echo(f"{moved.name}@{moved.alias} already is {moved.version}")
        return
    note = f" (forced past: {'; '.join(moved.gate_failures)})" if moved.gate_failures else ""
    typer.echo(f"{moved.name}@{moved.alias}: {moved.previous or '(unset)'} -> {moved.version}{note}")


def rollback(
    name: str = typer.Argument(..., help="Registry name."),
    alias: str = typer.Option("prod", "--alias", help="Alias to move back."),
    reason: str = typer.Option(None, "--reason", help="Why; recorded in the alias history."),
    merged: bool = MergedOption,
    storage: str = StorageOption,
) -> None:
    """Move ALIAS back to the version it was promoted to before the current one."""
    from lorafleet.registry import rollback as rollback_alias

    moved = rollback_alias(_storage(storage), name, alias=alias, reason=reason, kind=_kind(merged))
    typer.echo(f"{moved.name}@{moved.alias}: {moved.previous} -> {moved.version}")


def compose(
    adapters: list[str] = typer.Argument(..., help="Parents: NAME@VERSION ... (then the weights may follow)."),
    weights: list[str] = typer.Option(..., "--weights", help="One weight per parent: --weights 0.7 0.3 (or 0.7,0.3)."),
    method: str = typer.Option("linear", "--method", help="linear | cat | svd | ties | dare_linear | ... (PEFT)."),
    density: float = typer.Option(None, "--density", help="Share of weights kept (ties/dare/magnitude_prune)."),
    svd_rank: int = typer.Option(None, "--svd-rank", help="Rank of the result for *_svd methods."),
    name: str = typer.Option(..., "--name", help="Registry name of the composed adapter."),
    storage: str = StorageOption,
    target: Path = TargetOption,
) -> None:
    """Combine published LoRA adapters with PEFT's add_weighted_adapter and publish the result."""
    from lorafleet.registry import compose_adapters

    parents, numbers = split_weights(adapters, weights)
    published = compose_adapters(
        _storage(storage),
        parents,
        numbers,
        name=name,
        method=method,
        density=density,
        svd_rank=svd_rank,
        profile=_profile(target),
        profile_source=str(target),
    )
    typer.echo(
        f"published adapters/{published.reference} from {', '.join(published.manifest.parents)}\n{published.path}"
    )


def split_weights(adapters: list[str], weights: list[str]) -> tuple[list[str], list[float]]:
    """`A B --weights 0.7 0.3` reaches us as adapters [A, B, 0.3] and weights [0.7]: move trailing numbers over."""
    from lorafleet.registry import InvalidReference

    values = [part for text in weights for part in text.split(",") if part.strip()]
    parents, from_option = list(adapters), len(values)
    while parents and len(values) < len(parents) - 1 and FLOAT.match(parents[-1]):
        values.insert(from_option, parents.pop())
    try:
        return parents, [float(v) for v in values]
    except ValueError:
        raise InvalidReference(f"--weights must be numbers, got {values}") from None


@app.command("list")
def list_command(
    name: str = typer.Argument(None, help="Only this name."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    storage: str = StorageOption,
) -> None:
    """Every published adapter and merged model, with its versions and aliases."""
    from lorafleet.registry import list_entries

    entries = list_entries(_storage(storage), name)
    broken = [entry for entry in entries if entry.error]
    if as_json:
        typer.echo(json.dumps([entry.as_dict() for entry in entries], indent=2))
    else:
        if not entries:
            typer.echo("(nothing published)")
        for entry in entries:
            aliases = " ".join(f"{alias}={version}" for alias, version in entry.aliases.items())
            aliases = "(aliases unreadable)" if entry.error else aliases
            typer.echo(f"{entry.kind}/{entry.name}\t{' '.join(entry.versions)}\t{aliases}")
    for entry in broken:
        typer.echo(f"error: {entry.kind}/{entry.name}: {entry.error}", err=True)
    if broken:
        raise typer.Exit(1)


@app.command("show")
def show(
    reference: str = typer.Argument(..., help="NAME, NAME@v3 or NAME@alias."),
    merged: bool = MergedOption,
    storage: str = StorageOption,
) -> None:
    """Print the manifest of a version (JSON); its folder goes to stderr. Shown even if its files were changed."""
    from lorafleet.registry import resolve

    found = resolve(_storage(storage), reference, kind=_kind(merged), verify=False)
    typer.echo(f"{found.kind}/{found.reference}: {found.path}", err=True)
    typer.echo(found.manifest.to_json(), nl=False)


@app.command("resolve")
def resolve_command(
    reference: str = typer.Argument(..., help="NAME, NAME@v3 or NAME@alias."),
    merged: bool = MergedOption,
    storage: str = StorageOption,
) -> None:
    """Print the folder a reference names now (for scripts and serving)."""
    from lorafleet.registry import resolve

    typer.echo(resolve(_storage(storage), reference, kind=_kind(merged)).path)


@app.command("verify")
def verify(
    name: str = typer.Argument(None, help="Only this name (default: everything)."),
    storage: str = StorageOption,
) -> None:
    """Recompute the sha256 of every file of every visible version; exit 1 naming each bad file."""
    from lorafleet.registry import RegistryError
    from lorafleet.registry import verify as verify_registry

    report = verify_registry(_storage(storage), name)
    for problem in report.problems:
        typer.echo(f"FAILED {problem}")
    typer.echo(f"{len(report.checked)} version(s) checked, {len(report.problems)} problem(s)")
    if not report.ok:
        raise RegistryError(f"verify failed: {len(report.problems)} problem(s), listed above")


@app.command("unpublish")
def unpublish(
    reference: str = typer.Argument(..., help="NAME@vN."),
    force: bool = typer.Option(False, "--force", help="Even if an alias such as prod points at it (removes it)."),
    merged: bool = MergedOption,
    storage: str = StorageOption,
) -> None:
    """Remove one version atomically; its number is never reused."""
    from lorafleet.registry import unpublish as unpublish_version

    version = unpublish_version(_storage(storage), reference, kind=_kind(merged), force=force)
    typer.echo(f"unpublished {reference.partition('@')[0]}@{version}")


@app.command("policy")
def policy(
    name: str = typer.Argument(..., help="Registry name."),
    overrides: list[str] = typer.Option(None, "--set", help="key.path=value, e.g. thresholds.mae.max=20. Repeatable."),
    merged: bool = MergedOption,
    storage: str = StorageOption,
) -> None:
    """Show the promotion policy of NAME, or change it with --set."""
    import yaml

    from lorafleet.registry import Registry, load_policy, set_policy

    if overrides:
        current = set_policy(_storage(storage), name, overrides, kind=_kind(merged))
    else:
        current = load_policy(Registry.open(_storage(storage)), name, _kind(merged))
    if current is None:
        typer.echo(f"{name}: no policy.yaml, promotion is not gated")
        return
    shown = current.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    typer.echo(yaml.safe_dump(shown, sort_keys=False), nl=False)


@app.command("fingerprint")
def fingerprint(model: str = typer.Argument(..., help="A base model folder or builtin:<name>.")) -> None:
    """Print the base and tokenizer fingerprints (for a serving profile's tokenizer_hash)."""
    from lorafleet.models import resolve_model
    from lorafleet.registry import base_fingerprint, tokenizer_fingerprint

    folder = resolve_model(model)
    typer.echo(f"base_fingerprint: {base_fingerprint(folder)}\ntokenizer_hash: {tokenizer_fingerprint(folder)}")


@app.command("check")
def check(
    adapter: str = typer.Argument(..., help="An adapter folder, or a registry reference NAME@VERSION."),
    target: Path = typer.Option(..., "--target", dir_okay=False, help="Serving profile YAML."),
    storage: str = StorageOption,
) -> None:
    """Would the server described by --target load this adapter? Exit 1 with every reason if not."""
    from lorafleet.registry import ContractViolation, check_adapter_against_profile, resolve

    folder = Path(adapter) if Path(adapter).is_dir() else resolve(_storage(storage), adapter).path
    reasons = check_adapter_against_profile(folder, _profile(target))
    if reasons:
        raise ContractViolation(str(folder), str(target), reasons)
    typer.echo(f"ok: {target} can serve {folder}")
