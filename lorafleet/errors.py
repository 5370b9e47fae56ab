"""Errors that the CLI turns into clear messages and exit codes (no stack traces for user mistakes)."""

from __future__ import annotations

import errno
from dataclasses import dataclass


class LorafleetError(Exception):
    """A problem the user can fix; the CLI prints the message and exits with `exit_code`."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One problem in an input file: where it is and what is wrong."""

    location: str  # "field.path" or "file:line" or "file:line field"
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class ConfigError(LorafleetError):
    """A job or serving config is invalid; carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"] + [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # crosses process boundaries (Ray workers → driver) with its problems intact
        return (self.__class__, (self.source, self.problems))


class DataError(LorafleetError):
    """Rows of a dataset are invalid; carries every bad row (file:line and field)."""

    exit_code = 2

    def __init__(self, source: str, problems: list[Problem], total_bad: int | None = None):
        self.source = source
        self.problems = problems
        count = total_bad if total_bad is not None else len(problems)
        lines = [f"{source}: {count} bad row(s)"] + [f"  - {p}" for p in problems]
        if count > len(problems):
            lines.append(f"  ... and {count - len(problems)} more")
        self.total_bad = count
        super().__init__("\n".join(lines))

    def __reduce__(self):  # crosses process boundaries (Ray workers → driver) with its problems intact
        return (self.__class__, (self.source, self.problems, self.total_bad))


OS_ERROR_HINTS = {
    errno.EROFS: "the storage is mounted read-only: nothing was changed",
    errno.ENOSPC: "the disk is full: free some space or use other storage; nothing half-written was kept",
    errno.EDQUOT: "the disk quota is used up: nothing half-written was kept",
    errno.EACCES: "permission denied: check the owner and mode of that path",
    errno.EPERM: "operation not permitted: check the owner and mode of that path",
}


def describe_os_error(exc: OSError) -> str:
    """An OSError as one line for the CLI: what the OS said, the path, and what it means for the user."""
    where = f": {exc.filename}" if exc.filename else ""
    hint = OS_ERROR_HINTS.get(exc.errno or 0)
    return f"{exc.strerror or exc}{where}" + (f" ({hint})" if hint else "")
