"""Running the simulator under uvicorn: in the foreground, or in a thread for tests.

:func:`serve` blocks (the CLI's ``llm-worker simulate`` calls it). :func:`running_simulator`
serves on a background thread and yields the base URL, the way httpx's own test suite
serves small apps on a real uvicorn server: real sockets, real HTTP, no mocks.

uvicorn's ``auto`` choices pick uvloop and httptools when they are installed and fall back
to asyncio and h11 otherwise; the simulator works with either.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from worker.simulator.app import create_app
from worker.simulator.config import SimulatorConfig

# A benchmark opens thousands of connections at once; the default backlog drops some.
LISTEN_BACKLOG = 4096
# uvicorn closes idle keep-alive connections after 5 s; a busy benchmark client then reuses
# a socket the server is closing and gets a ReadError. Upstreams keep them about a minute.
KEEP_ALIVE_S = 75


def uvicorn_config(config: SimulatorConfig) -> uvicorn.Config:
    """uvicorn settings for the simulator: quiet, no lifespan, made for many connections."""
    return uvicorn.Config(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level="warning",
        access_log=False,
        # Pinned, not "auto": the faults that drop a connection rely on how uvicorn's h11
        # protocol handles an app that gives up mid-response; with httptools (installed by
        # uvicorn[standard]) a reset before the response started became a 500.
        loop="asyncio",
        http="h11",
        lifespan="off",
        backlog=LISTEN_BACKLOG,
        timeout_keep_alive=KEEP_ALIVE_S,
    )


def serve(config: SimulatorConfig) -> None:
    """Serve the simulator until interrupted (SIGINT/SIGTERM)."""
    uvicorn.Server(uvicorn_config(config)).run()


class ServerThread:
    """A uvicorn server on a daemon thread; ``port=0`` binds a free port."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.server = uvicorn.Server(uvicorn_config(config))
        self.host = config.host
        self._port = config.port
        self._thread = threading.Thread(target=self.server.run, name="simulator", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (the real one, once started, when the config asked for port 0)."""
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start serving and wait until the socket is listening."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        # uvicorn offers no event to wait on, only this flag; poll it briefly.
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("simulator server exited during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"simulator did not start within {timeout_s} s")
            time.sleep(0.005)
        self._port = int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the server to exit and wait for its thread."""
        self.server.should_exit = True
        self._thread.join(timeout_s)


@contextmanager
def running_simulator(config: SimulatorConfig | None = None) -> Iterator[str]:
    """Serve the simulator on a background thread; yield its base URL; stop on exit.

    The default config listens on a free loopback port with no pacing delay.
    """
    thread = ServerThread(config or SimulatorConfig(port=0, ttft_s=0.0))
    thread.start()
    try:
        yield thread.url
    finally:
        thread.stop()
