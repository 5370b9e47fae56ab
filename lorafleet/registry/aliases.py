"""`aliases.json`: the movable names of one registry entry (`latest`, `prod`, ...) and their full history.

Every change takes a file lock beside it and rewrites the file atomically, so concurrent publishers and
promoters never lose each other's updates and readers never see half a file. The history is append-only:
it is the audit log (who moved what, when, forced or not, why) and what `rollback` replays.

`latest` is derived from the folder listing when read (the newest visible version), so a publisher killed
between claiming its version and updating this file still leaves `latest` right.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import filelock
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.object_store import PreconditionFailed
from lorafleet.registry.layout import LATEST, Kind, Registry, RegistryError
from lorafleet.registry.manifest import user_at_host, utc_now
from lorafleet.storage import write_text_atomic

ALIASES_FILE = "aliases.json"
LOCK_FILE = ".aliases.lock"
LOCK_TIMEOUT_S = 120
REFRESH_ATTEMPTS = 20


class AliasEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    at: str
    action: Literal["publish", "promote", "rollback", "unpublish"]
    alias: str
    version: str | None = Field(None, description="Where the alias points after the event (None: removed).")
    previous: str | None = None
    forced: bool = False
    reason: str | None = None
    gate: list[str] = Field(default_factory=list, description="Gate failures overridden by --force.")
    by: str = ""


class AliasFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    aliases: dict[str, str] = Field(default_factory=dict)
    history: list[AliasEvent] = Field(default_factory=list)

    def record(self, action: str, alias: str, version: str | None, **details: Any) -> AliasEvent:
        """Point `alias` at `version` (None removes it) and append the event to the history."""
        event = AliasEvent(
            at=utc_now(),
            action=action,
            alias=alias,
            version=version,
            previous=self.aliases.get(alias),
            by=user_at_host(),
            **details,
        )
        if version is None:
            self.aliases.pop(alias, None)
        else:
            self.aliases[alias] = version
        self.history.append(event)
        return event

    def promotion_stack(self, alias: str) -> list[str]:
        """Versions `alias` was promoted to, minus those rolled back: rollback returns to the one below the top."""
        stack: list[str] = []
        for event in self.history:
            if event.alias != alias:
                continue
            if event.action == "promote" and event.version:
                stack.append(event.version)
            elif event.action == "rollback" and stack:
                stack.pop()
            elif event.version is None:
                stack.clear()
        return stack


def _read(registry: Registry, name: str, kind: Kind) -> AliasFile:
    path = registry.name_dir(name, kind) / ALIASES_FILE
    if not path.is_file():
        return AliasFile()
    try:
        return AliasFile.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise RegistryError(f"{path} is corrupt: {exc.errors()[0]['msg']}") from None


def read_aliases(registry: Registry, name: str, kind: Kind = "adapters") -> AliasFile:
    """The aliases of `name` with `latest` set to the newest visible version."""
    state = _read(registry, name, kind)
    newest = registry.latest(name, kind)
    if newest:
        state.aliases[LATEST] = newest
    else:
        state.aliases.pop(LATEST, None)
    return state


@contextmanager
def editing_aliases(registry: Registry, name: str, kind: Kind = "adapters") -> Iterator[AliasFile]:
    """Hold the lock, yield the current file for changes, write it back atomically on success."""
    folder = registry.name_dir(name, kind)
    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(folder / LOCK_FILE), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RegistryError(f"{folder / LOCK_FILE} is held by another process for over {LOCK_TIMEOUT_S}s") from None
    try:
        with _remote_side(registry, name, kind):  # an object store: its lock, a fresh read, a conditional write
            state = _read(registry, name, kind)
            yield state
            write_text_atomic(folder / ALIASES_FILE, state.model_dump_json(indent=2) + "\n")
            os.chmod(folder / ALIASES_FILE, 0o644)  # the atomic write's temp file is owner-only; serving reads it
    finally:
        lock.release()


def _remote_side(registry: Registry, name: str, kind: Kind):
    return registry.remote.editing_aliases(kind, name) if registry.remote is not None else nullcontext()


def refresh_latest(registry: Registry, name: str, kind: Kind, *, action: str = "publish") -> str | None:
    """Move `latest` to the newest visible version (called after every publish and unpublish). On an object
    store a concurrent edit makes the conditional write lose; this edit is safe to redo, so it is redone."""
    for attempt in range(REFRESH_ATTEMPTS):
        try:
            with editing_aliases(registry, name, kind) as state:
                newest = registry.latest(name, kind)
                if state.aliases.get(LATEST) != newest:
                    state.record(action, LATEST, newest)
            return newest
        except PreconditionFailed:
            if attempt == REFRESH_ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0.01, 0.1) * (attempt + 1))
            if registry.remote is not None:
                registry.remote.pull()  # versions published meanwhile
    return None
