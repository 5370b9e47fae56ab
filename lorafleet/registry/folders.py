"""The names of the registry's folders, shared by the filesystem layout (layout.py) and the object store (remote.py).

    <storage>/<kind>/<name>/v<N>/      a version (visible); .retired/v<N> a tombstone; .claims/v<N> a claim
"""

from __future__ import annotations

import re
from typing import Literal

Kind = Literal["adapters", "models"]
KINDS: tuple[Kind, ...] = ("adapters", "models")
VERSION_PATTERN = re.compile(r"^v([1-9][0-9]{0,8})$")
RETIRED_DIR = ".retired"
CLAIMS_DIR = ".claims"  # object stores: numbers taken by publishes (finished or not)
