"""What a failed Ray Train fit tells the user: our own error if a worker raised one, else one line a worker.

Ray's error text carries every worker's traceback; the console shows one line per failed worker and points to
the run's log, where the workers' full output already is.
"""

from __future__ import annotations

from lorafleet.errors import LorafleetError

TRACEBACK_START = "Traceback (most recent call last)"
MAX_LINE_CHARS = 400


def lorafleet_cause(error: BaseException | str, seen: set[int] | None = None) -> LorafleetError | None:
    """The LorafleetError a worker raised, found inside Ray's wrappers (worker failures, task errors, causes)."""
    seen = seen if seen is not None else set()
    if isinstance(error, str) or id(error) in seen:
        return None
    seen.add(id(error))
    if isinstance(error, LorafleetError):
        return error
    inner: list[BaseException] = list(getattr(error, "worker_failures", {}).values())
    inner += [e for e in (getattr(error, "cause", None), error.__cause__, error.__context__) if e is not None]
    return next((found for e in inner if (found := lorafleet_cause(e, seen)) is not None), None)


def failure_summary(error: BaseException | str) -> str:
    """One line per failed worker (`worker RANK: Type: message`), or one line for any other error."""
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return "\n".join(f"worker {rank}: {one_line(failures[rank])}" for rank in sorted(failures, key=str))
    return one_line(error)


def one_line(error: BaseException | str) -> str:
    """The error's own message without traceback: the line a traceback ends with, or the text's first line."""
    cause = getattr(error, "cause", None)  # Ray's task errors keep the worker's exception here
    if isinstance(cause, BaseException):
        error = cause
    text = str(error).strip()
    if TRACEBACK_START in text:
        text = _last_line_of_traceback(text)
    line = next((candidate.strip() for candidate in text.splitlines() if candidate.strip()), "")
    if isinstance(error, BaseException) and not line.startswith(type(error).__name__):
        line = f"{type(error).__name__}: {line}" if line else type(error).__name__
    return line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 3] + "..."


def _last_line_of_traceback(text: str) -> str:
    """The exception line after the last traceback: the first unindented line once the frames end."""
    after = text.rsplit(TRACEBACK_START, 1)[1].splitlines()[1:]
    unindented = [line for line in after if line.strip() and not line[0].isspace()]
    return unindented[0] if unindented else ""
