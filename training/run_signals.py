"""What SIGINT and SIGTERM do to `lorafleet train`: a clean stop, recorded, resumable.

Without this, Ctrl-C or a pod's SIGTERM reaches Ray's handlers: native stacks on the console, no run.json, and a
KeyboardInterrupt that exits 1 with no message. Here the signal raises `RunStopped` in the main thread; the
launcher records the run as `stopped` (its last complete checkpoint stays, so `--resume` continues from it) and
the CLI exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM) with one line saying how to resume.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lorafleet.errors import LorafleetError


class RunStopped(LorafleetError):
    """SIGINT or SIGTERM stopped the run: recorded as `stopped`, resumable; exits 128 + the signal number."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.run_id = ""
        super().__init__(self.signal_name)

    def __str__(self) -> str:
        resume = f"; resume it with `lorafleet train --resume {self.run_id}`" if self.run_id else ""
        return f"stopped by {self.signal_name}{resume} (it continues from its last complete checkpoint)"


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], None]]:
    """SIGINT/SIGTERM raise RunStopped in the main thread; a second signal while stopping gets the previous
    handler (Ctrl-C twice forces the exit). Yields `rearm`: `ray.init` installs Ray's own handlers (SIGTERM
    then aborts with a native stack dump), so the launcher calls it once Ray is up."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def stop(signum: int, frame: object) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise RunStopped(signum)

    def rearm() -> None:
        for sig in signals:
            signal.signal(sig, stop)

    rearm()
    try:
        yield rearm
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fit_interruptibly(trainer: Any) -> Any:
    """`trainer.fit()` in a helper thread while the main thread waits, so the handlers above stay in charge:
    in the main thread, Ray Train replaces SIGINT's handler with its own, which exits 1 without a word. A
    stopped run leaves the thread blocked; the process exit (and Ray's shutdown) ends it."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread as it was raised
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short waits: a signal's handler runs in the main thread between them
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
