"""Keep the component schemas of OpenAI's published API description that the server's responses are tested against.

    python tools/openai_schemas.py PATH/TO/openapi.json --commit SHA > tests/data/openai_schemas.json

Takes the named roots and every schema they reference (transitively), drops prose and examples (descriptions,
x-oaiMeta), and records where they came from. tests/test_openai_conformance.py validates every response shape
the server sends against them with JSON Schema 2020-12 (the dialect of OpenAPI 3.1).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

ROOTS = (
    "ListModelsResponse",
    "Model",
    "CreateCompletionResponse",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ErrorResponse",
)
PROSE = ("description", "x-oaiMeta", "example", "examples", "title")
PREFIX = "#/components/schemas/"


def without_prose(node: Any, *, property_names: bool = False) -> Any:
    """`node` without prose keywords; under `properties` the keys are property names and are all kept."""
    if isinstance(node, dict):
        return {
            key: without_prose(value, property_names=key == "properties" and not property_names)
            for key, value in node.items()
            if property_names or key not in PROSE
        }
    if isinstance(node, list):
        return [without_prose(value) for value in node]
    return node


def references(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].removeprefix(PREFIX)} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(references(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(references(value) for value in node))
    return set()


def closure(schemas: dict[str, Any], roots: tuple[str, ...]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name not in kept:
            kept[name] = without_prose(schemas[name])
            pending += sorted(references(kept[name]) - set(kept))
    return dict(sorted(kept.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("openapi", help="openapi.json of github.com/openai/openai-openapi")
    parser.add_argument("--commit", required=True, help="the commit it was read at")
    args = parser.parse_args()
    with open(args.openapi) as handle:
        spec = json.load(handle)
    document = {
        "source": {
            "repository": "https://github.com/openai/openai-openapi",
            "path": "openapi.json",
            "commit": args.commit,
            "openapi": spec["openapi"],
            "api_version": spec["info"]["version"],
            "license": "MIT (see the repository's LICENSE)",
            "kept": "the schemas reachable from " + ", ".join(ROOTS) + "; descriptions and examples dropped",
        },
        "components": {"schemas": closure(spec["components"]["schemas"], ROOTS)},
    }
    json.dump(document, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
