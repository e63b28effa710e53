"""Every Redis client of the project is built here: one Redis server, or a master found
through Redis Sentinel.

A Redis URL is either a plain one (``redis://``, ``rediss://``, ``unix://``) or kombu's Sentinel
form, ``sentinel://host:port;sentinel://host:port;...`` (optionally ``/db``), with the service
name in ``REDIS_SENTINEL_MASTER``. A Sentinel client asks the Sentinels for the master on every
new connection, and a connection to a master that died or was demoted (``READONLY``) fails with
a connection error: the command is then retried, on a fresh connection to whichever master the
Sentinels name by then, for ``REDIS_RETRY_S``. Every write we retry is idempotent or a script
that checks state first, so a retry after a lost reply is safe.

Redis Cluster is refused (:func:`refuse_cluster`): our scripts build key names inside Lua
(batch counts, inboxes) and the broker needs every queue on one node. See
docs/high-availability.md.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelManagedConnection
from redis.backoff import AbstractBackoff
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    NoScriptError,
    ReadOnlyError,
    TimeoutError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from worker.connections.urls import is_sentinel_url, parse_sentinel_url
from worker.errors import LLMWorkerError

if TYPE_CHECKING:
    from worker.settings import Settings

#: What a command retries on: a lost or refused connection (a master that died, or no master
#: named yet), a timeout, a server still loading its data, and a demoted master.
RETRY_ON = (ConnectionError, TimeoutError, BusyLoadingError, ReadOnlyError)


class RedisClusterUnsupported(LLMWorkerError):
    """The Redis server runs in cluster mode, which llm-worker does not support."""

    def __init__(self) -> None:
        super().__init__(
            "this Redis runs in cluster mode (cluster_enabled:1), which llm-worker does not "
            "support: its Lua scripts touch keys that a cluster would spread over several "
            "nodes (a job's batch counts, the broker's queues and inboxes), and Celery's Redis "
            "broker needs every queue on one server. For high availability run Redis under "
            "Sentinel (LLM_WORKER_REDIS_URL=sentinel://host:26379;sentinel://host2:26379 with "
            "LLM_WORKER_REDIS_SENTINEL_MASTER); see docs/high-availability.md"
        )


class ReplicationShort(LLMWorkerError):
    """A write reached fewer replicas than ``REDIS_MIN_REPLICAS_ACK`` within its timeout."""

    def __init__(self, what: str, acked: int, wanted: int, timeout_s: float) -> None:
        self.acked, self.wanted = acked, wanted
        super().__init__(
            f"{what} reached {acked} of the {wanted} Redis replicas that "
            f"LLM_WORKER_REDIS_MIN_REPLICAS_ACK asks for within {timeout_s:g} s; it was written "
            "to the master but may be lost if the master fails now. Retry with the same job_id "
            "(it is idempotent) once the replicas are back"
        )


class WindowBackoff(AbstractBackoff):
    """Doubling waits from 0.1 s up to 2 s, jittered; :func:`retries_for` counts how many of
    them cover a retry window."""

    CAP_S = 2.0
    BASE_S = 0.1

    def reset(self) -> None:
        pass

    def compute(self, failures: int) -> float:
        step = min(self.CAP_S, self.BASE_S * 2 ** min(failures, 16))
        return float(step / 2 + random.uniform(0, step / 2))


def retries_for(window_s: float) -> int:
    """Retries whose longest waits add up to ``window_s`` (the window is a bound, not a sum
    of the jittered waits, which are between half and all of each step)."""
    total, failures = 0.0, 0
    while total < window_s:
        failures += 1
        total += min(WindowBackoff.CAP_S, WindowBackoff.BASE_S * 2 ** min(failures, 16))
    return failures


class SentinelConnection(SentinelManagedConnection):
    """redis-py's Sentinel connection asks the Sentinels for the master only when its pool
    hands it out; a connection that a retry reuses after a disconnect (``send_command`` on a
    closed socket) reconnects to the address it had, the dead master, for the whole retry
    window (measured: jobs stalled past two minutes after a failover). Here every reconnect
    asks the Sentinels first."""

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if getattr(self, "_sock", None):
            return
        if retry_socket_connect:  # a reconnect from outside connect_to: ask the Sentinels
            self.connect()
            return
        # (The redis stubs predate connect_check_health, redis-py 6's.)
        super().connect_check_health(  # type: ignore[misc]
            check_health=check_health, retry_socket_connect=False
        )


class AsyncSentinelConnection(AsyncSentinelManagedConnection):
    """The asyncio twin of :class:`SentinelConnection`."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return
        if retry_socket_connect:
            await self.connect()
            return
        await super().connect_check_health(  # type: ignore[misc]
            check_health=check_health,
            retry_socket_connect=False,
        )


class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection instead of failing, as our
    plain pools do (a gevent worker runs hundreds of jobs on one pool)."""


# The stubs make these pools generic in their connection class; at run time they are not.
class AsyncBlockingSentinelPool(
    AsyncSentinelConnectionPool,  # type: ignore[type-arg]
    aredis.BlockingConnectionPool,  # type: ignore[type-arg]
):
    """The asyncio twin of :class:`BlockingSentinelPool`."""


def _options(
    settings: Settings,
    *,
    retry_s: float | None,
    max_connections: int | None,
    wait_s: float | None,
    extra: dict[str, Any],
    retry_class: type[Retry] | type[AsyncRetry] = Retry,
) -> dict[str, Any]:
    window = settings.redis_retry_s if retry_s is None else retry_s
    options: dict[str, Any] = {
        "socket_keepalive": True,
        "health_check_interval": 25,
        "retry": retry_class(WindowBackoff(), retries_for(window) if window > 0 else 0),
        "retry_on_error": list(RETRY_ON),
        **extra,
    }
    if max_connections is not None:
        options["max_connections"] = max_connections
        options["timeout"] = wait_s
    return options


def _password(settings: Settings) -> str | None:
    secret = settings.redis_password
    return secret.get_secret_value() if secret is not None else None


def _sentinel_kwargs(settings: Settings, extra: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": extra.get("socket_timeout", 5.0),
        "socket_connect_timeout": extra.get("socket_connect_timeout", 5.0),
        "socket_keepalive": True,
    }
    secret = settings.redis_sentinel_password
    if secret is not None:
        kwargs["password"] = secret.get_secret_value()
    return kwargs


def _master_name(settings: Settings) -> str:
    name = settings.redis_sentinel_master
    if not name:  # settings refuse this; a hand-built Settings object may still get here
        raise LLMWorkerError("a sentinel:// URL needs LLM_WORKER_REDIS_SENTINEL_MASTER")
    return name


def redis_client(
    settings: Settings,
    *,
    url: str | None = None,
    max_connections: int | None = None,
    wait_s: float | None = 30.0,
    retry_s: float | None = None,
    **extra: Any,
) -> redis.Redis[bytes]:
    """A client of ``url`` (the Redis URL by default) that rides out a restart or a Sentinel
    failover for ``retry_s`` (``REDIS_RETRY_S`` by default; 0: no retry).

    With ``max_connections`` the pool waits up to ``wait_s`` for a free connection, then
    raises; without, it grows as needed. ``extra`` goes to each connection
    (``socket_timeout``, ``client_name``...).
    """
    url = url or settings.redis_url
    options = _options(
        settings, retry_s=retry_s, max_connections=max_connections, wait_s=wait_s, extra=extra
    )
    if is_sentinel_url(url):
        parsed = parse_sentinel_url(url)
        sentinel = Sentinel(
            list(parsed.hosts),
            sentinel_kwargs=_sentinel_kwargs(settings, extra),
            db=parsed.db,
            username=parsed.username,
            password=parsed.password or _password(settings),
        )
        pool_class = BlockingSentinelPool if max_connections is not None else SentinelConnectionPool
        client: redis.Redis[bytes] = sentinel.master_for(
            _master_name(settings),
            connection_pool_class=pool_class,
            connection_class=SentinelConnection,
            **options,
        )
        return client
    if urlsplit(url).password is None and settings.redis_password is not None:
        options["password"] = _password(settings)
    pool_class_plain = (
        redis.BlockingConnectionPool if max_connections is not None else redis.ConnectionPool
    )
    pool = pool_class_plain.from_url(url, **options)
    return redis.Redis(connection_pool=pool)


def async_redis_client(
    settings: Settings,
    *,
    url: str | None = None,
    max_connections: int | None = None,
    wait_s: float | None = 30.0,
    retry_s: float | None = None,
    **extra: Any,
) -> aredis.Redis[bytes]:
    """The ``redis.asyncio`` twin of :func:`redis_client`. It connects on first use, in the
    event loop that uses it."""
    url = url or settings.redis_url
    options = _options(
        settings,
        retry_s=retry_s,
        max_connections=max_connections,
        wait_s=wait_s,
        extra=extra,
        retry_class=AsyncRetry,
    )
    if is_sentinel_url(url):
        parsed = parse_sentinel_url(url)
        sentinel = AsyncSentinel(
            list(parsed.hosts),
            sentinel_kwargs=_sentinel_kwargs(settings, extra),
            db=parsed.db,
            username=parsed.username,
            password=parsed.password or _password(settings),
        )
        pool_class = (
            AsyncBlockingSentinelPool
            if max_connections is not None
            else AsyncSentinelConnectionPool
        )
        client: aredis.Redis[bytes] = sentinel.master_for(
            _master_name(settings),
            connection_pool_class=pool_class,
            connection_class=AsyncSentinelConnection,
            **options,
        )
        return client
    if urlsplit(url).password is None and settings.redis_password is not None:
        options["password"] = _password(settings)
    pool_class_plain = (
        aredis.BlockingConnectionPool if max_connections is not None else aredis.ConnectionPool
    )
    pool: aredis.ConnectionPool[Any] = pool_class_plain.from_url(url, **options)
    return aredis.Redis(connection_pool=pool)


def execute_pipeline(
    client: redis.Redis[Any], fill: Callable[[Any], None], scripts: Sequence[Any] = ()
) -> list[Any]:
    """A pipeline (no transaction) that ``fill`` queues commands on, executed; built and run
    once more on ``NOSCRIPT``. redis-py loads a pipeline's registered scripts before it sends
    them, and a failover (or restart) in between reaches a master without them: then none of
    them ran (measured: a submit failed with NoScriptError during a failover).

    ``scripts``: for a ``fill`` that queues ``EVALSHA`` calls of them directly (no ``SCRIPT
    EXISTS`` round trip before each execute, as redis-py's registered scripts cost): a
    ``NOSCRIPT`` loads them before the second run (the synchronous twin of
    :func:`async_execute_scripts`)."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        fill(pipe)
        try:
            return list(pipe.execute())
        except NoScriptError:
            if attempt == 2:
                raise
            for script in scripts:
                client.script_load(script.script)  # type: ignore[no-untyped-call]
    raise AssertionError("unreachable")


async def async_execute_pipeline(
    client: aredis.Redis[Any], fill: Callable[[Any], Awaitable[None]]
) -> list[Any]:
    """The asyncio twin of :func:`execute_pipeline`."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        await fill(pipe)
        try:
            return list(await pipe.execute())
        except NoScriptError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def async_execute_scripts(
    client: aredis.Redis[Any], fill: Callable[[Any], None], scripts: Sequence[Any]
) -> list[Any]:
    """As :func:`async_execute_pipeline`, for a pipeline ``fill`` queues ``EVALSHA`` calls of
    ``scripts`` on directly: redis-py's pipeline asks ``SCRIPT EXISTS`` for its registered
    scripts before every execute, one round trip more on each; here a ``NOSCRIPT`` (a Redis
    restarted or failed over since) loads them, and the pipeline runs once more (a script
    call that ran before the retry answers the same again: submit and claim are
    idempotent)."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        fill(pipe)
        try:
            return list(await pipe.execute())
        except NoScriptError:
            if attempt == 2:
                raise
            for script in scripts:
                await client.script_load(script.script)  # type: ignore[no-untyped-call]
    raise AssertionError("unreachable")


def _is_cluster(info: Any) -> bool:
    if isinstance(info, dict):
        return str(info.get("cluster_enabled", "0")) == "1"
    return False


def refuse_cluster(client: redis.Redis[Any]) -> None:
    """Raise :class:`RedisClusterUnsupported` when ``client``'s server runs in cluster mode."""
    if _is_cluster(client.info("cluster")):
        raise RedisClusterUnsupported()


def check_not_cluster(settings: Settings) -> None:
    """At a service's start: raise :class:`RedisClusterUnsupported` when the Redis (or the
    Redis broker) runs in cluster mode. A server that does not answer now is left to the
    service's own retries (each client checks again on first use)."""
    urls = {settings.redis_url, settings.effective_broker_url}
    for url in sorted(urls):
        if url.split(":", 1)[0] not in {"redis", "rediss", "unix", "sentinel"}:
            continue
        client = redis_client(
            settings, url=url, retry_s=0, socket_timeout=5, socket_connect_timeout=5
        )
        try:
            refuse_cluster(client)
        except redis.RedisError:
            pass
        finally:
            client.close()


async def async_refuse_cluster(client: aredis.Redis[Any]) -> None:
    if _is_cluster(await client.info("cluster")):
        raise RedisClusterUnsupported()


@dataclass(frozen=True)
class ReplicaAck:
    """``REDIS_MIN_REPLICAS_ACK``: a write that must reach replicas ends its pipeline with
    ``WAIT`` (on the same connection, which is what ``WAIT`` counts from)."""

    wanted: int = 0
    timeout_s: float = 2.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplicaAck:
        return cls(settings.redis_min_replicas_ack, settings.redis_replicas_ack_timeout_s)

    def __bool__(self) -> bool:
        return self.wanted > 0

    def add(self, pipe: Any) -> None:
        """Queue the ``WAIT`` after the writes already in ``pipe`` (nothing when off)."""
        if self.wanted:
            pipe.execute_command("WAIT", self.wanted, max(1, int(self.timeout_s * 1000)))

    def check(self, results: list[Any], what: str) -> list[Any]:
        """The pipeline's results without the ``WAIT``'s; :class:`ReplicationShort` when
        fewer replicas than wanted have the writes."""
        if not self.wanted:
            return results
        acked = int(results[-1])
        if acked < self.wanted:
            raise ReplicationShort(what, acked, self.wanted, self.timeout_s)
        return results[:-1]
