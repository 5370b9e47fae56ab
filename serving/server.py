"""Running the API server: in the foreground (`lorafleet serve`) or in a background thread (tests, benchmarks).

    with ServerThread(create_app(config)) as server:      # 127.0.0.1 on a free port, engine started
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="none").models.list()

Shutdown is graceful either way: uvicorn stops accepting connections, lets in-flight responses (streams
included) finish for up to `drain_timeout_s`, then the app's lifespan drains and stops the engine.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from lorafleet.serving.config import ServingConfig


def free_port(avoid: range | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free now (and outside `avoid`)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if avoid is None or port not in avoid:
            return port


class ServerThread:
    """uvicorn serving `app` from a background thread; the socket is bound before start (no port race)."""

    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str = "warning",
        drain_timeout_s: float = 30,
    ):
        self.app = app
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            app,
            log_level=log_level,
            timeout_graceful_shutdown=int(drain_timeout_s),
            lifespan="on",
            backlog=2048,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 300) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited during startup (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60) -> None:
        """Graceful: in-flight requests finish first."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class _GracefulServer(uvicorn.Server):
    """uvicorn, but a SIGTERM/SIGINT that ends in a clean drain exits 0 instead of re-raising the signal."""

    @contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve_forever(app: FastAPI, config: ServingConfig) -> None:
    """Foreground server for `lorafleet serve`: SIGTERM/SIGINT drain in-flight requests, then exit 0."""
    settings = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=int(config.drain_timeout_s),
        backlog=2048,
        limit_concurrency=config.max_connections,
    )
    _GracefulServer(settings).run()
