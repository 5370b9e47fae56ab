"""Shared storage addressed by URI, and the atomic writes everything on it goes through.

A storage URI is a local/NFS/PVC path, `file://...`, or an object store (`s3://...`) reached through
pyarrow's filesystems. Local writes go to a temporary name in the same folder, are fsynced, then renamed:
readers see the old file or the new one, never half of one. Object stores make single-object PUTs
atomic by themselves; folders there are committed by writing their marker file last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

COMPLETE_MARKER = ".complete"
def is_local_uri(uri: str) -> bool:
    """A filesystem path (plain or file://), as opposed to an object store (s3://, gs://, ...)."""
    return "://" not in uri or uri.startswith("file://")


@dataclass(frozen=True)
class StorageRoot:
    """The root of shared storage: runs live in `runs/<run-id>/`, the registry in `adapters/` and `models/`."""

    uri: str

    @property
    def is_local(self) -> bool:
        return is_local_uri(self.uri)

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.uri.removeprefix("file://"))

    def join(self, *parts: str) -> str:
        base = self.uri.rstrip("/")
        return "/".join([base, *parts])

    def run_dir(self, run_id: str) -> str:
        return self.join("runs", run_id)


def local_path_of(uri: str) -> Path | None:
    """The filesystem path behind a local URI, or None for an object store."""
    root = StorageRoot(uri)
    return root.local_path if root.is_local else None


class StorageFolder:
    """A folder at a storage URI (a local path or an object store) whose files are read and written by name."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")

    def __str__(self) -> str:
        return self.uri

    @property
    def local(self) -> Path | None:
        return local_path_of(self.uri)

    def read_text(self, name: str) -> str | None:
        local = self.local
        if local is not None:
            path = local / name
            return path.read_text(encoding="utf-8") if path.is_file() else None
        import pyarrow.fs as pafs

        filesystem, path = pafs.FileSystem.from_uri(f"{self.uri}/{name}")
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with filesystem.open_input_stream(path) as stream:
            return stream.read().decode()

    def write_bytes(self, name: str, data: bytes) -> None:
        local = self.local
        if local is not None:
            write_bytes_atomic(local / name, data)
            return
        import pyarrow.fs as pafs

        filesystem, path = pafs.FileSystem.from_uri(f"{self.uri}/{name}")
        with filesystem.open_output_stream(path) as stream:  # one PUT: atomic on object stores
            stream.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers never see a partial file, even after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp is private; shared storage is read by other users (serving pods)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the folder that holds the new name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(folder))


def make_readable(root: Path) -> None:
    """Folders 0755, files 0644: temp names are created private, but shared storage is read by other users."""
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(Path(folder) / name, 0o644)


def rename_into_place(staging: Path, target: Path) -> None:
    """Rename the finished folder `staging` to `target`; an existing `target` is moved aside first and removed
    after, so `target` always names a whole folder."""
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, retired)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target` to write into. When the block ends normally it is made readable,
    fsynced and renamed into place (`rename_into_place`); on an error it is removed and `target` is untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        make_readable(staging)
        fsync_tree(staging)
        rename_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def install_dir_atomic(source: Path, target: Path, *, replace: bool = False) -> None:
    """Copy folder `source` to `target` under a temporary name, fsync it, then rename it into place.

    With `replace`, an existing `target` is swapped out (moved aside, then removed) after the new copy is
    complete, so `target` always names a whole folder.
    """
    with staged_folder(target) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if target.exists() and not replace:
            raise FileExistsError(f"{target} already exists")


def upload_dir(source: Path, target_uri: str) -> None:
    """Copy a local folder to shared storage: atomic rename locally, marker-last on object stores."""
    local = local_path_of(target_uri)
    if local is not None:
        install_dir_atomic(source, local, replace=True)
        return
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(target_uri)
    pafs.copy_files(str(source), path, destination_filesystem=filesystem)
    with filesystem.open_output_stream(f"{path}/{COMPLETE_MARKER}") as stream:
        stream.write(b"")
