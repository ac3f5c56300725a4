"""Running the app: `run_server` (what `kvtrt serve` calls: uvicorn, graceful SIGTERM, exit 0) and
`ServerThread` (a real uvicorn server on a free loopback port in a thread, for tests and embedding)."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

log = logging.getLogger("kvtrt.serve")


def load_kwargs(kv: str = "full", kv_memory: str | int | None = None, max_queue: int | None = None,
                threads: int | None = None, max_batch: int | None = None,
                prefix_cache: str | int | None = None) -> dict[str, Any]:
    """Keyword arguments for `kvtrt.load`; the scheduler options only when given."""
    def size(value):
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    kw: dict[str, Any] = {"kv": kv}
    for name, value in (("kv_memory", size(kv_memory)), ("max_queue", max_queue), ("threads", threads),
                        ("max_batch", max_batch), ("prefix_cache", size(prefix_cache))):
        if value is not None:
            kw[name] = value
    return kw


def run_server(directory: str, *, host: str = "127.0.0.1", port: int = 8000, kv: str = "full",
               kv_memory: str | int | None = None, max_queue: int | None = None, api_key: str | None = None,
               served_model_name: str | None = None, threads: int | None = None, drain_timeout: float = 30.0,
               log_level: str = "info", max_batch: int | None = None, prefix_cache: str | int | None = None) -> int:
    """Serve the export in `directory` until SIGTERM/SIGINT; returns the process exit code.

    The port opens at once and `/health` answers 503 until the model is loaded. On SIGTERM the
    server stops accepting connections, lets the requests in flight finish for up to
    `drain_timeout` seconds (then cancels them), stops the scheduler and returns 0."""
    import uvicorn

    from .. import load
    from .app import create_app

    name = served_model_name or _default_name(directory)
    failure: list[BaseException] = []
    server_ref: list[Any] = []

    def loader():
        try:
            return load(directory, **load_kwargs(kv, kv_memory, max_queue, threads, max_batch, prefix_cache))
        except BaseException as exc:  # no model, no server: stop with a clear message
            failure.append(exc)
            if server_ref:
                server_ref[0].should_exit = True
            raise

    app = create_app(loader, served_model_name=name, api_key=api_key)
    state = app.state.kvtrt

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # /health turns 503 as soon as the drain starts
            state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            lifespan="on")
    server = Server(config)
    server_ref.append(server)
    # uvicorn restores the handlers it found and re-raises the signal after its graceful shutdown;
    # with the default SIGTERM handler that would kill the process (exit -15) after a clean drain
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"kvtrt serve: loading {directory} as {name!r}, listening on http://{host}:{port}/v1 "
              f"(GET /health is 200 once the model is loaded)", file=sys.stderr, flush=True)
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        print(f"kvtrt serve: error: loading the model failed: {failure[0]}", file=sys.stderr)
        return 1
    if not server.started:
        return 1
    return 0


def _default_name(directory: str) -> str:
    from pathlib import Path

    return Path(directory).resolve().name


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerThread:
    """A uvicorn server for `app` in a daemon thread on `host` (loopback by default).

        with ServerThread(create_app(llm)) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning",
                 drain_timeout: float = 10.0):
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level=log_level,
                                                    timeout_graceful_shutdown=drain_timeout, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_ready(url: str, timeout: float = 120.0, proc: Any = None, interval: float = 0.1) -> None:
    """Poll `url/health` until it answers 200 (a started `kvtrt serve`), or fail after `timeout`."""
    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            response = httpx.get(url.rstrip("/") + "/health", timeout=2.0)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(interval)
    raise TimeoutError(f"{url} was not ready after {timeout:.0f} s (last: {last})")


Loader = Callable[[], Any]
