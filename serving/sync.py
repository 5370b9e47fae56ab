"""Adapter sync: keep the adapters loaded on serving replicas (vLLM or the CPU engine) equal to the registry's.

    lorafleet sync --storage /mnt/lorafleet --target http://127.0.0.1:8000 --adapters price@prod,support --interval 30s

Each pass (every `interval_s`, or once):
1. desired: every reference resolved in the registry (`price@prod` -> the v3 folder), served under its registry
   name (`price`, what clients ask for); without `adapters`, every published name at `latest`;
2. per target, what is loaded (`GET /v1/models`: name -> `root`, the folder it was loaded from, on both engines);
3. unload the adapters sync manages that are no longer wanted, then roll out every name whose folder differs.

A rollout never lets `price` answer with an unverified adapter: load v3 as `price.v3`, probe that name with a
1-token completion, then load v3 under `price` in place (`load_inplace`: the CPU engine and vLLM load the new
weights first and then move the name, so a request gets the old adapter or the new one, never half of one),
then unload `price.v3`. If the load or the probe fails, `price` keeps its old version and the error is reported.
A rollback is the same move backwards: sync follows wherever the alias points. Only a name that is no longer
published is unloaded: an alias naming a version that is not there, or a registry that cannot be read, is an
error in the log and the pass's report, and the name keeps serving what it serves.

With `route` (`lorafleet sync --route-port PORT`, what vLLM needs): no name on the server is ever reused for other
weights. Each version is loaded under a name of its own, `price.v3-<digest of its files>`, probed, and then the
alias router (serving/alias_router.py) in front of the one target sends `price` there; the version before is
unloaded after the switch. vLLM keys prefix-cache blocks by the adapter's name, so moving a name to new weights
(in place, or by unload + load) could serve KV computed with the old ones (vllm-project/vllm issue 42125).

Managed adapters are those loaded from a folder inside `<storage>/adapters/` (what sync and `lorafleet serve
--adapters` load) plus what this process loaded; anything else (an adapter loaded by hand from another folder)
and the base model are never touched. HTTP calls are retried with exponential backoff on connection errors and
5xx; a target that keeps failing is reported and skipped, the others are still synced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from lorafleet.errors import LorafleetError
from lorafleet.registry import NotFound, Registry, RegistryError, parse_reference, resolve
from lorafleet.serving.alias_router import AliasTable
from lorafleet.serving.client import ServingAPIError, ServingClient
from lorafleet.serving.config import check_adapter_name
from lorafleet.serving.sync_config import SyncConfig

log = logging.getLogger("lorafleet.sync")
T = TypeVar("T")


class SyncFailed(LorafleetError):
    """A sync pass did not converge (a target down, a load or probe failed, a reference not found)."""

    exit_code = 1


@dataclass(frozen=True)
class DesiredAdapter:
    """One adapter a server should serve: under `name`, the registry folder `path` (version `version`)."""

    name: str
    reference: str
    version: str
    path: str
    weights: str  # a digest of the version's files

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def served_name(self) -> str:
        """With routing: the name this version is loaded under on the server, for ever its own."""
        return check_adapter_name(f"{self.name}.{self.version}-{self.weights}")

    @property
    def staging_name(self) -> str:
        """The versioned name a new version is loaded and probed under before `name` moves to it."""
        return check_adapter_name(f"{self.name}.{self.version}")


@dataclass
class Desired:
    adapters: dict[str, DesiredAdapter] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    keep: set[str] = field(default_factory=set)  # names that could not be read this pass: leave them as they are


@dataclass
class SyncReport:
    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return not self.errors


def read_desired(config: SyncConfig) -> Desired:
    """Resolve the wanted references now (aliases move, so this runs every pass)."""
    desired = Desired()
    registry = Registry.open(config.storage)
    references = config.adapters if config.adapters is not None else registry.names("adapters")
    for reference in references:
        ref = parse_reference(reference)
        try:
            found = resolve(registry.base, ref)
        except NotFound as exc:
            if registry.versions(ref.name, "adapters"):
                # The name has published versions but its alias names one that is not there (a half-copied
                # registry, a hand edit): an error, and whatever serves the name now keeps serving it.
                desired.errors.append(f"{reference}: {exc}; {ref.name} keeps what it serves now")
                desired.keep.add(ref.name)
            elif config.adapters is not None:  # asked for by name, but not (or no longer) published: not served
                desired.errors.append(f"{reference}: {exc}")
            continue
        except (RegistryError, OSError) as exc:
            desired.errors.append(f"{reference}: {exc}")
            desired.keep.add(ref.name)
            continue
        digest = hashlib.sha256(
            "".join(f"{name}:{file.sha256};" for name, file in sorted(found.manifest.files.items())).encode()
        ).hexdigest()[:10]
        desired.adapters[ref.name] = DesiredAdapter(ref.name, str(reference), found.version, str(found.path), digest)
    return desired


def same_folder(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


class Target:
    """One server, and the adapters this process loaded on it (for servers whose /v1/models has no `root`)."""

    def __init__(self, url: str, config: SyncConfig):
        self.url = url
        self.client = ServingClient(url, api_key=config.api_key, timeout=config.timeout_s)
        self.ours: dict[str, str] = {}

    def root_of(self, name: str, loaded: dict[str, str | None]) -> str | None:
        if name not in loaded:
            return None
        return loaded[name] or self.ours.get(name)

    def forget_missing(self, loaded: dict[str, str | None]) -> None:
        """A restarted server lost what we loaded: forget it, so it is loaded again."""
        self.ours = {name: path for name, path in self.ours.items() if name in loaded}


class RolloutFailed(LorafleetError):
    pass


class Syncer:
    """Reconciles every target with the registry: `reconcile()` once, or `run(stop)` every interval."""

    def __init__(self, config: SyncConfig):
        self.config = config
        self.targets = [Target(url, config) for url in config.targets]
        self.adapters_dir = os.path.realpath(Registry.open(config.storage).kind_dir("adapters"))
        self.aliases = AliasTable() if config.route else None  # what the router resolves, when routing

    def run(self, stop: threading.Event | None = None) -> None:
        """Reconcile every `interval_s` until `stop` is set; a failing pass is logged, never fatal."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.reconcile()
            except Exception:  # the loop must outlive any one bad pass (storage hiccup, a bug in one branch)
                log.exception("sync pass failed; next try in %.0fs", self.config.interval_s)
            stop.wait(self.config.interval_s)

    def reconcile(self) -> SyncReport:
        report = SyncReport()
        desired = read_desired(self.config)
        for error in desired.errors:
            log.error("registry: %s", error)
        report.errors += [f"registry: {error}" for error in desired.errors]
        for target in self.targets:
            self._sync_target(target, desired, report)
        return report

    def close(self) -> None:
        for target in self.targets:
            target.client.close()

    # ---- one target -------------------------------------------------------------------------------------------

    def _sync_target(self, target: Target, desired: Desired, report: SyncReport) -> None:
        try:
            loaded = self._retrying(target.client.adapters)
        except (httpx.HTTPError, ServingAPIError) as exc:
            report.errors.append(f"{target.url}: cannot list adapters: {exc}")
            log.error("%s: cannot list adapters: %s", target.url, exc)
            return
        target.forget_missing(loaded)
        if self.aliases is not None:
            self._route_target(target, loaded, desired, report)
            return
        self._unload_all(target, self._unwanted(target, loaded, desired), report, "no longer wanted")
        for wanted in desired.adapters.values():
            current = target.root_of(wanted.name, loaded)
            if same_folder(current, wanted.path):
                continue
            try:
                self._rollout(target, wanted, current, loaded)
            except (RolloutFailed, httpx.HTTPError, ServingAPIError, ValueError) as exc:
                report.errors.append(f"{target.url}: {wanted.label}: {exc}")
                log.error("%s: %s not rolled out: %s", target.url, wanted.label, exc)
                continue
            report.changes.append(f"{wanted.label} as {wanted.name} on {target.url}")

    def _unwanted(
        self, target: Target, loaded: dict[str, str | None], desired: Desired, wanted: set[str] | None = None
    ) -> list[str]:
        wanted = set(desired.adapters) | desired.keep if wanted is None else wanted
        return [
            name for name, root in loaded.items() if name not in wanted and (self._managed(root) or name in target.ours)
        ]

    # ---- one target behind the alias router: every version under its own name -------------------------------

    def _route_target(self, target: Target, loaded: dict[str, str | None], desired: Desired, report: SyncReport):
        """Load each wanted version under its own name, probe it, point the alias at it; then unload the rest."""
        for wanted in desired.adapters.values():
            served = wanted.served_name
            if served not in loaded:
                try:
                    self._retrying(lambda w=wanted: target.client.load_adapter(w.served_name, w.path))
                    target.ours[served] = wanted.path
                    self._retrying(lambda w=wanted: target.client.probe(w.served_name, self.config.probe_prompt))
                except (httpx.HTTPError, ServingAPIError) as exc:
                    self._unload_quietly(target, served)
                    was = self.aliases.get(wanted.name)
                    report.errors.append(f"{target.url}: {wanted.label}: {exc}; {wanted.name} -> {was or 'nothing'}")
                    log.error("%s: %s not rolled out: %s", target.url, wanted.label, exc)
                    continue
                loaded[served] = wanted.path
                log.info("loaded %s as %s on %s", wanted.label, served, target.url)
            was = self.aliases.get(wanted.name)
            if was != served:
                self.aliases.set(wanted.name, served)
                report.changes.append(f"{wanted.label} as {wanted.name} on {target.url}")
                log.info("%s -> %s on %s%s", wanted.name, served, target.url, f" (was {was})" if was else "")
        for alias in set(self.aliases.snapshot()) - set(desired.adapters) - desired.keep:
            self.aliases.drop(alias)
        kept = set(self.aliases.snapshot().values())
        self._unload_all(target, self._unwanted(target, loaded, desired, wanted=kept), report, "no alias names it")

    def _unload_all(self, target: Target, names: list[str], report: SyncReport, why: str) -> None:
        for name in names:
            try:
                self._unload(target, name)
            except (httpx.HTTPError, ServingAPIError) as exc:
                report.errors.append(f"{target.url}: unload {name}: {exc}")
                log.error("%s: could not unload %s: %s", target.url, name, exc)
                continue
            report.changes.append(f"unloaded {name} on {target.url}")
            log.info("unloaded %s (%s) on %s", name, why, target.url)

    def _managed(self, root: str | None) -> bool:
        if not root:
            return False
        real = os.path.realpath(root)
        return Path(real).is_relative_to(self.adapters_dir)

    def _rollout(
        self, target: Target, wanted: DesiredAdapter, current: str | None, loaded: dict[str, str | None]
    ) -> None:
        client, url, staging_name = target.client, target.url, wanted.staging_name
        was = self._version_of(current) if wanted.name in loaded else None
        try:
            self._retrying(lambda: self._load(client, staging_name, wanted.path))
        except (httpx.HTTPError, ServingAPIError) as exc:
            raise RolloutFailed(
                f"loading {wanted.path} as {staging_name} failed ({exc}); {self._keeps(wanted, was)}"
            ) from None
        target.ours[staging_name] = wanted.path
        log.info("loaded %s as %s on %s", wanted.label, staging_name, url)
        try:
            self._retrying(lambda: client.probe(staging_name, self.config.probe_prompt))
        except (httpx.HTTPError, ServingAPIError) as exc:
            self._unload_quietly(target, staging_name)
            raise RolloutFailed(f"the probe of {staging_name} failed ({exc}); {self._keeps(wanted, was)}") from None
        try:
            self._retrying(lambda: self._load(client, wanted.name, wanted.path))
        except (httpx.HTTPError, ServingAPIError) as exc:
            self._unload_quietly(target, staging_name)
            raise RolloutFailed(f"switching {wanted.name} failed ({exc}); {self._keeps(wanted, was)}") from None
        target.ours[wanted.name] = wanted.path
        log.info("loaded %s as %s on %s%s", wanted.label, wanted.name, url, f" (was {was})" if was else "")
        self._unload(target, staging_name)
        log.info("unloaded %s on %s", staging_name, url)

    def _load(self, client: ServingClient, name: str, path: str) -> None:
        """Load `path` as `name`, replacing what `name` serves (new weights first, then the name moves)."""
        try:
            client.load_adapter(name, path, load_inplace=True)
        except ServingAPIError as exc:
            if exc.status != 400 or "already been loaded" not in exc.message:
                raise
            # A vLLM without load_inplace ignores the flag: unload then load (`name` answers 404 in between).
            log.warning("%s does not replace adapters in place: unloading %s first", client.http.base_url, name)
            client.unload_adapter(name)
            client.load_adapter(name, path)

    def _unload(self, target: Target, name: str) -> None:
        def unload() -> None:
            try:
                target.client.unload_adapter(name)
            except ServingAPIError as exc:
                if exc.status != 404:  # already gone (a retried call that did succeed, or unloaded by hand)
                    raise

        self._retrying(unload)
        target.ours.pop(name, None)

    def _unload_quietly(self, target: Target, name: str) -> None:
        try:
            self._unload(target, name)
        except (httpx.HTTPError, ServingAPIError) as exc:
            log.warning(
                "%s: could not unload %s after a failed rollout (the next pass retries): %s", target.url, name, exc
            )

    def _version_of(self, root: str | None) -> str | None:
        """`v2` for a folder `<storage>/adapters/<name>/v2`, else the folder itself."""
        if not root:
            return None
        real = Path(os.path.realpath(root))
        return real.name if self._managed(root) and real.name.startswith("v") else root

    @staticmethod
    def _keeps(wanted: DesiredAdapter, was: str | None) -> str:
        return f"{wanted.name} keeps serving {was}" if was else f"{wanted.name} is not served"

    def _retrying(self, call: Callable[[], T]) -> T:
        """`call()`, retried with exponential backoff on connection errors and 5xx answers."""
        delay = self.config.backoff_s
        for attempt in range(self.config.retries + 1):
            try:
                return call()
            except (httpx.TransportError, ServingAPIError) as exc:
                retryable = isinstance(exc, httpx.TransportError) or exc.status >= 500
                if not retryable or attempt == self.config.retries:
                    raise
                log.debug("retrying in %.1fs after: %s", delay, exc)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")
