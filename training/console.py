"""What `lorafleet train` shows: lorafleet's own lines on the console; Ray's and the libraries' in the run's log.

Workers print lorafleet's lines as `[<run id>] ...` (progress, data summary, resume). Ray forwards every line
its processes write to the driver; `RunConsole` prints ours and appends all of them, with the process that wrote
them, to `<run folder>/logs/train.log` (under the lorafleet cache when the run folder is on an object store).
Library loggers and warnings of the driver go there too. `--verbose` also shows everything as Ray prints it.
The log file is created on its first line, so a run refused before it starts leaves no folder behind.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

from lorafleet.paths import home
from lorafleet.storage import StorageFolder

LOG_FILE = "logs/train.log"
CHATTY_LOGGERS = ("ray", "DeepSpeed", "deepspeed", "transformers", "bitsandbytes", "accelerate", "torch", "py.warnings")


class LazyLog:
    """A text file opened (folders made) on its first write."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            if self._handle is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._handle = open(self.path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 (close())
            self._handle.write(text)

    def flush(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.flush()

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None


class RunConsole:
    """The console of a run (or of a sweep: `folder` is then the sweep's, `name` its id)."""

    def __init__(self, folder: StorageFolder, *, verbose: bool = False, name: str | None = None):
        name = name or folder.uri.rsplit("/", 1)[-1]
        self.mark = f"[{name}] "
        self.verbose = verbose
        local = folder.local
        self.log_path = (local / LOG_FILE) if local is not None else home() / "logs" / f"{name}.log"
        self._log = LazyLog(self.log_path)
        self._handler = logging.StreamHandler(self._log)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._previous_last_resort = logging.lastResort

    def start(self) -> None:
        """Before Ray starts: the driver's library loggers and warnings go to the log (and nowhere else, unless
        verbose)."""
        import ray  # noqa: F401  (importing Ray configures its loggers; ours must come after)

        self._route_loggers()
        if self.verbose:
            return
        logging.lastResort = self._handler  # what loggers without handlers print (ray.init clears Ray's)
        logging.captureWarnings(True)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

    def _route_loggers(self) -> None:
        for name in CHATTY_LOGGERS:
            logger = logging.getLogger(name)
            if self.verbose:
                if self._handler not in logger.handlers:
                    logger.addHandler(self._handler)
            else:
                logger.handlers, logger.propagate = [self._handler], False

    def follow_workers(self) -> None:
        """After `ray.init`: every worker line into the log; unless verbose, only ours on the console (Ray's own
        printing is replaced through a private hook of the pinned Ray)."""
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        self._route_loggers()  # ray.init reconfigures Ray's loggers
        if not self.verbose:
            global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        global_worker_stdstream_dispatcher.remove_handler("lorafleet_console")
        global_worker_stdstream_dispatcher.add_handler("lorafleet_console", self.worker_lines)

    def worker_lines(self, data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or "worker"
        where = f"({who} pid={data.get('pid')}{', stderr' if data.get('is_err') else ''})"
        for line in data.get("lines", ()):
            self._log.write(f"{where} {line}\n")
            if not self.verbose and line.startswith(self.mark) and not data.get("is_err"):
                print(line, file=sys.stdout, flush=True)
        self._log.flush()

    def stop(self) -> None:
        for name in CHATTY_LOGGERS:
            logger = logging.getLogger(name)
            if self._handler in logger.handlers:
                logger.removeHandler(self._handler)
                logger.propagate = True
        if not self.verbose:
            logging.lastResort = self._previous_last_resort
            logging.captureWarnings(False)
        self._log.close()
