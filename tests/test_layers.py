"""Layers you can see, and a package that installs cleanly.

- the import-linter contract of pyproject.toml holds (the real `lint-imports`, as `make lint` runs it), on an
  installed copy: there `lorafleet.training` and `lorafleet.serving` are real subfolders, as in a wheel;
- every module of lorafleet belongs to one layer of that contract, and no import cycle exists between modules
  (function-level imports included: grimp reads them all);
- a wheel built from the repo installs into a fresh venv, where `lorafleet --help`, `validate` and `demo --help`
  work, and no top-level `training`/`serving` package lands in site-packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(REPO)],
        capture_output=True, text=True, cwd=target,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (target / "lorafleet" / "training" / "launcher.py").is_file()
    return target


def test_import_linter_contract_holds(installed_copy: Path) -> None:
    result = subprocess.run(
        [str(BIN / "lint-imports"), str(REPO / "pyproject.toml")],
        capture_output=True, text=True, cwd=installed_copy, env={**os.environ, "PYTHONPATH": str(installed_copy)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout, result.stdout


GRAPH = """
import json, grimp
graph = grimp.build_graph("lorafleet")
print(json.dumps({m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}))
"""


def _import_graph(site: Path) -> dict[str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", GRAPH], capture_output=True, text=True, cwd=site, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, []))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules(installed_copy: Path) -> None:
    edges = _import_graph(installed_copy)
    assert "lorafleet.serving.engine" in edges and "lorafleet.training.worker" in edges
    assert _cycles(edges) == []


def test_every_module_is_in_a_layer(installed_copy: Path) -> None:
    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {part.strip() for layer in contract["layers"] for part in layer.replace("|", ":").split(":")}
    top_level = {m for m in _import_graph(installed_copy) if m.count(".") == 1}
    assert top_level - named == set(), "add these modules to a layer of the import-linter contract"


def _purelib(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.check_output([str(python), "-c", code], text=True).strip())


@pytest.mark.slow  # builds a wheel and a venv: ~1 min
def test_wheel_installs_into_a_fresh_venv_without_generic_top_level_packages(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("lorafleet-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    site = _purelib(python)
    assert sorted(p.name for p in site.iterdir() if p.name in ("training", "serving")) == []
    assert (site / "lorafleet" / "training" / "launcher.py").is_file()
    assert (site / "lorafleet" / "configs" / "demo.yaml").is_file()
    # The dependencies come from this project's venv (appended after the fresh venv's own site-packages, and
    # without its .pth files, so the editable install of this checkout is not seen); lorafleet from the wheel.
    (site / "project-deps.pth").write_text(f"{_purelib(Path(sys.executable))}\n")
    env = {**os.environ, "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import lorafleet.training.launcher as m; print(m.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)  # fmt: skip
    assert where.returncode == 0 and where.stdout.startswith(str(site)), where.stdout + where.stderr
    lorafleet = venv / "bin" / "lorafleet"
    for args in (["--help"], ["validate", str(REPO / "configs" / "tiny.yaml")], ["demo", "--help"]):
        result = subprocess.run([str(lorafleet), *args], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert result.returncode == 0, (args, result.stdout, result.stderr[-2000:])
    demo_help = subprocess.run([str(lorafleet), "demo", "--help"], capture_output=True, text=True, cwd=tmp_path,
                               env={**env, "COLUMNS": "300"}).stdout  # fmt: skip
    assert str(site / "lorafleet" / "configs") in demo_help  # the shipped configs, found inside the wheel
