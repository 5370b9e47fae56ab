"""The one name rule: adapter, model and job names, and run ids, are folder names on shared storage and model ids.

Lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, no '..'; the whole string must match
(a trailing newline is not a name). The registry, the CLI, the server and sync all check names here.
"""

from __future__ import annotations

import re

NAME_CHARS = re.compile(r"[a-z0-9][a-z0-9._-]*")
MAX_NAME = 63
MAX_RUN_ID = 128
NAME_RULE = "1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit (no '/', no '..')"


def _valid(text: object, limit: int) -> bool:
    return (
        isinstance(text, str) and len(text) <= limit and NAME_CHARS.fullmatch(text) is not None and ".." not in text
    )


def is_valid_name(name: object) -> bool:
    """A registry name (adapters, merged models), a served adapter name or a job name."""
    return _valid(name, MAX_NAME)


def is_valid_run_id(run_id: object) -> bool:
    """A run id: the same characters as a name, up to 128 of them (a job name plus a timestamp or a suffix)."""
    return _valid(run_id, MAX_RUN_ID)
