"""What `lorafleet train` shows: lorafleet's own lines on the console; Ray's and the libraries' in the run's log.

Workers print lorafleet's lines as `[<run id>] ...` (progress, data summary, resume). Ray forwards every line
its processes write to the driver; `RunConsole` prints ours and appends all of them, with the process that wrote
them, to `<run folder>/logs/train.log` (under the lorafleet cache when the run folder is on an object store).
Library loggers and warnings of the driver go there too. `--verbose` shows everything as Ray prints it.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings

from lorafleet.paths import home
from lorafleet.runs import RunFolder

LOG_FILE = "logs/train.log"
CHATTY_LOGGERS = ("ray", "DeepSpeed", "deepspeed", "transformers", "bitsandbytes", "accelerate", "torch", "py.warnings")


class RunConsole:
    def __init__(self, folder: RunFolder, *, verbose: bool = False):
        self.mark = f"[{folder.run_id}] "
        self.verbose = verbose
        local = folder.local
        self.log_path = (local / LOG_FILE) if local is not None else home() / "logs" / f"{folder.run_id}.log"
        self._lock = threading.Lock()
        self._log = None

    def start(self) -> None:
        """Before Ray starts: the driver's library loggers and warnings go to the log file (unless verbose)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 (closed in stop)
        if self.verbose:
            return
        import ray  # noqa: F401  (importing Ray configures its loggers; ours must come after)

        self._handler = logging.StreamHandler(self._log)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._previous_last_resort = logging.lastResort
        logging.lastResort = self._handler  # what loggers without handlers print (ray.init clears Ray's)
        self._route_loggers()
        logging.captureWarnings(True)
        warnings.simplefilter("default")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

    def _route_loggers(self) -> None:
        for name in CHATTY_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers = [self._handler]
            logger.propagate = False

    def follow_workers(self) -> None:
        """After `ray.init`: take over Ray's printing of worker lines (a private hook of the pinned Ray)."""
        if self.verbose:
            return
        self._route_loggers()
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        global_worker_stdstream_dispatcher.remove_handler("lorafleet_console")
        global_worker_stdstream_dispatcher.add_handler("lorafleet_console", self.worker_lines)

    def worker_lines(self, data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or "worker"
        where = f"({who} pid={data.get('pid')}{', stderr' if data.get('is_err') else ''})"
        with self._lock:
            for line in data.get("lines", ()):
                if self._log is not None:
                    self._log.write(f"{where} {line}\n")
                if line.startswith(self.mark) and not data.get("is_err"):
                    print(line, file=sys.stdout, flush=True)
            if self._log is not None:
                self._log.flush()

    def stop(self) -> None:
        if not self.verbose and self._log is not None:
            logging.lastResort = self._previous_last_resort
            for name in CHATTY_LOGGERS:
                logging.getLogger(name).handlers = []
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
