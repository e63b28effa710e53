"""What a worker process holds for all its jobs: settings, one Redis pool, one HTTP client.

Built on first use in each process (prefork children build their own after the fork).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from functools import cached_property

import redis

from worker import metrics as m
from worker.broker import UNACKED_INDEX_KEY, is_redis_broker
from worker.connections import clients as connections
from worker.keys import Keys
from worker.ratelimit.gate import RateLimitGate
from worker.runtime.job_store import WorkerStore
from worker.runtime.leases import LeaseKeeper
from worker.runtime.upstream import UpstreamClient
from worker.settings import Settings


def redis_client(
    settings: Settings, *, url: str | None = None, max_connections: int | None = None
) -> redis.Redis[bytes]:
    """The worker's client: a pool that blocks rather than fails when every connection is
    busy, and that rides out a Redis restart or a Sentinel failover for ``REDIS_RETRY_S``
    (:mod:`worker.connections`); every write we retry is idempotent or a script that checks
    state first."""
    return connections.redis_client(
        settings, url=url, max_connections=max_connections or settings.concurrency + 16
    )


@dataclass
class Runtime:
    settings: Settings
    store: WorkerStore
    upstream: UpstreamClient
    hostname: str
    leases: LeaseKeeper

    def __post_init__(self) -> None:
        # The models of these settings are the values the model label may take here.
        m.add_model_labels(self.settings.catalogue.label_names())
        m.add_tenant_labels(self.settings.tenant_names())

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


def delivery_clock(settings: Settings, results: redis.Redis[bytes]) -> DeliveryClock | None:
    """What refreshes a running job's delivery with its lease: on the broker's Redis (the
    results Redis when they are one); None for a broker other than Redis."""
    broker = settings.effective_broker_url
    if broker == str(settings.redis_url):
        return DeliveryClock(results)
    if is_redis_broker(broker):
        return DeliveryClock(redis_client(settings, url=broker, max_connections=4))
    return None


class DeliveryClock:
    """Marks deliveries as alive in kombu's ``unacked_index`` (score: last seen alive)."""

    def __init__(self, client: redis.Redis[bytes]) -> None:
        self.client = client

    def touch(self, tags: list[str]) -> None:
        # XX: a delivery acked meanwhile is not added back.
        self.client.zadd(UNACKED_INDEX_KEY, dict.fromkeys(tags, time.time()), xx=True)


def build_runtime(settings: Settings, *, shared_round_trips: bool = True) -> Runtime:
    """A worker's runtime; ``shared_round_trips``: see :class:`WorkerStore`."""
    client = redis_client(settings)
    connections.refuse_cluster(client)
    store = WorkerStore(
        client,
        Keys(settings.key_prefix),
        result_ttl_s=settings.result_ttl_s,
        dead_letters_max=settings.dead_letters_max,
        dead_letter_payload_bytes=settings.dead_letter_payload_bytes,
        replica_ack=connections.ReplicaAck.from_settings(settings),
        publish_linger_s=settings.publish_linger_s,
        shared_round_trips=shared_round_trips,
    )
    clock = delivery_clock(settings, client)
    return Runtime(
        settings=settings,
        store=store,
        upstream=UpstreamClient(settings),
        hostname=f"{socket.gethostname()}:{os.getpid()}",
        leases=LeaseKeeper(
            store,
            lease_ttl_s=settings.lease_ttl_s,
            touch_deliveries=clock.touch if clock is not None else None,
        ),
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
