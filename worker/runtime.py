"""What a worker process holds for all its jobs: settings, one Redis pool, one HTTP client.

Built on first use in each process (prefork children build their own after the fork).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

import redis

from worker.keys import Keys
from worker.settings import Settings
from worker.store import JobStore
from worker.upstream import UpstreamClient


def redis_client(settings: Settings, *, max_connections: int | None = None) -> redis.Redis[bytes]:
    """A client whose pool blocks rather than fails when every connection is busy."""
    pool = redis.BlockingConnectionPool.from_url(
        str(settings.redis_url),
        max_connections=max_connections or settings.concurrency + 16,
        timeout=30,
        socket_keepalive=True,
        health_check_interval=25,
        retry_on_timeout=True,
    )
    return redis.Redis(connection_pool=pool)


@dataclass
class Runtime:
    settings: Settings
    store: JobStore
    upstream: UpstreamClient
    hostname: str

    def close(self) -> None:
        self.upstream.close()
        self.store.redis.close()


_lock = threading.Lock()
#: This process's runtime, keyed by pid so that a forked child builds its own.
_runtimes: dict[int, Runtime] = {}


def build_runtime(settings: Settings) -> Runtime:
    client = redis_client(settings)
    return Runtime(
        settings=settings,
        store=JobStore(client, Keys(settings.key_prefix), result_ttl_s=settings.result_ttl_s),
        upstream=UpstreamClient(settings),
        hostname=f"{socket.gethostname()}:{os.getpid()}",
    )


def get_runtime(settings: Settings) -> Runtime:
    """This process's runtime, built once (and again after a fork)."""
    pid = os.getpid()
    runtime = _runtimes.get(pid)
    if runtime is None:
        with _lock:
            runtime = _runtimes.get(pid)
            if runtime is None:
                _runtimes.clear()  # a parent's runtime is unusable after the fork
                runtime = _runtimes[pid] = build_runtime(settings)
    return runtime
