"""One name rule (lorafleet.names), shared by the registry, the server, sync and job configs: the whole string must
match, so a trailing newline or a '..' is refused everywhere alike; no accepted name leaves the registry root."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.names import is_valid_name, is_valid_run_id
from lorafleet.registry.layout import InvalidReference, Registry, validate_name, validate_version
from lorafleet.serving.config import check_adapter_name

NAMES = [
    ("pricing", True),
    ("v1.2_x-y", True),
    ("a" * 63, True),
    ("a" * 64, False),
    ("evil\n", False),
    ("evil\r", False),
    ("a..b", False),
    ("..", False),
    ("a/b", False),
    ("../etc", False),
    ("Pricing", False),
    ("", False),
    ("-a", False),
    (".hidden", False),
    ("a b", False),
    ("é", False),
]


def _registry_accepts(name: str) -> bool:
    try:
        validate_name(name)
    except InvalidReference:
        return False
    return True


def _server_accepts(name: str) -> bool:
    try:
        check_adapter_name(name)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("name", "valid"), NAMES, ids=[repr(name) for name, _ in NAMES])
def test_registry_and_server_agree_on_each_name(name: str, valid: bool) -> None:
    assert is_valid_name(name) is valid
    assert _registry_accepts(name) is valid and _server_accepts(name) is valid


def test_versions_and_run_ids_match_whole_strings() -> None:
    with pytest.raises(InvalidReference):
        validate_version("v1\n")
    assert is_valid_run_id("price-20260101-000000") and not is_valid_run_id("price\n") and not is_valid_run_id("a..b")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=70) | st.from_regex(r"[a-z0-9._\-\n/]{0,70}"))
def test_any_name_is_accepted_by_both_or_refused_by_both_and_stays_inside_the_registry(name: str) -> None:
    tmp = Path("/tmp/lorafleet-names-registry")
    registry = Registry.open(str(tmp))
    accepted = _registry_accepts(name)
    assert accepted == _server_accepts(name) == is_valid_name(name)
    if accepted:
        folder = registry.name_dir(name).resolve()
        assert folder.parent == (tmp / "adapters").resolve()
