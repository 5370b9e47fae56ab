"""The versions every generated object names: Ray (as pinned in constraints.txt and installed) and lorafleet's image.

A test checks that the files written by hand agree: constraints.txt, the Helm chart's `lorafleetImage.tag`, the
Dockerfile's build tag and the generated k8s/ manifests.
"""

from __future__ import annotations

import importlib.metadata


def _installed(package: str, fallback: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return fallback


RAY_VERSION = _installed("ray", "2.60.0")
LORAFLEET_VERSION = _installed("lorafleet", "0.1.0")
DEFAULT_IMAGE = f"lorafleet:{LORAFLEET_VERSION}"
