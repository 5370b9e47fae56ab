"""Where lorafleet keeps its cache (models, demo data) and its default storage on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """`$LORAFLEET_HOME`, else `~/.cache/lorafleet`: converted models and generated data live here."""
    return Path(os.environ.get("LORAFLEET_HOME") or Path.home() / ".cache" / "lorafleet").expanduser()


def models_dir() -> Path:
    return home() / "models"


def data_dir() -> Path:
    return home() / "data"


def default_storage_uri() -> str:
    """`$LORAFLEET_STORAGE`, else a folder in the cache: runs and the registry go there."""
    return os.environ.get("LORAFLEET_STORAGE") or str(home() / "storage")


def shipped_configs_dir() -> Path:
    """The job configs shipped with lorafleet (`configs/` of the repo, `lorafleet/configs/` in a wheel)."""
    import lorafleet.configs

    return Path(lorafleet.configs.__file__).parent
