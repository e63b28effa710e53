"""What a worker process holds for all its jobs: settings, one Redis pool, one HTTP client.

Built on first use in each process (prefork children build their own after the fork).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from functools import cached_property

import redis
from redis.backoff import EqualJitterBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError
from redis.retry import Retry

from worker.keys import Keys
from worker.ratelimit.gate import RateLimitGate
from worker.runtime.job_store import WorkerStore
from worker.runtime.leases import LeaseKeeper
from worker.runtime.upstream import UpstreamClient
from worker.settings import Settings

#: Ride out a Redis restart (a connection refused, then LOADING while the AOF replays) for
#: about half a minute before a command fails; every write we retry is idempotent or a
#: script that checks state first.
REDIS_RETRIES = 12


def redis_client(settings: Settings, *, max_connections: int | None = None) -> redis.Redis[bytes]:
    """A client whose pool blocks rather than fails when every connection is busy."""
    pool = redis.BlockingConnectionPool.from_url(
        str(settings.redis_url),
        max_connections=max_connections or settings.concurrency + 16,
        timeout=30,
        socket_keepalive=True,
        health_check_interval=25,
        retry=Retry(EqualJitterBackoff(cap=4.0, base=0.1), REDIS_RETRIES),
        retry_on_error=[ConnectionError, TimeoutError, BusyLoadingError],
    )
    return redis.Redis(connection_pool=pool)


@dataclass
class Runtime:
    settings: Settings
    store: WorkerStore
    upstream: UpstreamClient
    hostname: str
    leases: LeaseKeeper

    @cached_property
    def rate_limit(self) -> RateLimitGate:
        """The shared rate limiter's gate, built on first use; inert without RATE_LIMITS."""
        return RateLimitGate.from_settings(
            self.settings, self.store.redis, metadata_of=self.store.metadata
        )

    def close(self) -> None:
        self.leases.close()
        self.upstream.close()
        self.store.redis.close()


_lock = threading.Lock()
#: This process's runtime, keyed by pid so that a forked child builds its own.
_runtimes: dict[int, Runtime] = {}


def build_runtime(settings: Settings) -> Runtime:
    client = redis_client(settings)
    store = WorkerStore(client, Keys(settings.key_prefix), result_ttl_s=settings.result_ttl_s)
    return Runtime(
        settings=settings,
        store=store,
        upstream=UpstreamClient(settings),
        hostname=f"{socket.gethostname()}:{os.getpid()}",
        leases=LeaseKeeper(store, lease_ttl_s=settings.lease_ttl_s),
    )


def current_runtime() -> Runtime | None:
    """This process's runtime if a job has built it, else None."""
    return _runtimes.get(os.getpid())


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
