"""The Celery app (``celery -A worker.celery_app worker -P gevent -c 500``).

Its configuration is built from :class:`~worker.settings.Settings` when Celery first reads it,
not at import, so importing this module touches neither the environment nor the network.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from worker.broker import (
    UNACKED_INDEX_KEY,
    amqp_queue,
    band_of,
    band_queues,
    is_amqp_broker,
    is_redis_broker,
)
from worker.settings import Settings, load_settings

#: Pools that must be patched in before anything else is imported (Celery's own set).
GREEN_POOLS = frozenset({"gevent", "eventlet"})


def restore_interval_s(visibility_s: float) -> float:
    """How often a worker sweeps for lapsed deliveries and refreshes its own: often enough
    that a refresh never misses the visibility timeout, and a lapsed one is found soon."""
    return max(1.0, min(5.0, visibility_s / 6))


def redis_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Redis transport options (our hardened subclass reads the same)."""
    visibility_s = settings.effective_visibility_timeout_s
    return {
        "visibility_timeout": visibility_s,
        "unacked_index_key": UNACKED_INDEX_KEY,
        # Every greenlet acks its own message; a pool smaller than the concurrency fails
        # acks with MaxConnectionsError, and unacked jobs come back as duplicates.
        "max_connections": settings.concurrency + 32,
        "socket_keepalive": True,
        "health_check_interval": 25,
        # Look for messages whose visibility timeout passed (a killed worker's jobs) every
        # few seconds (one ZRANGE under a mutex), so that recovery after a crash waits for
        # the visibility timeout, not ten times the sweep (kombu's default throttle). The
        # same schedule refreshes the deliveries this worker holds (see transport.py).
        "unacked_restore_throttle": 1,
        "unacked_restore_interval": restore_interval_s(visibility_s),
        # The sweep's mutex outlives a worker killed while sweeping: kombu's 300 s would
        # stop every other worker from recovering jobs for five minutes. Each restore is
        # a WATCH transaction on its own, so overlapping sweeps cannot duplicate a message.
        "unacked_mutex_expire": 10,
        # Traffic classes, read by our transport's fetch (docs/traffic-classes.md).
        "priority_aging_s": settings.priority_aging_s,
        "tenant_weights": dict(settings.tenant_weights),
        **sentinel_transport_options(settings),
    }


def amqp_config(settings: Settings) -> dict[str, Any]:
    """RabbitMQ: durable quorum queues, one per priority band (quorum queues hold no
    priorities), each behind a topic exchange so that Celery's native delayed delivery carries
    a postponed job (a countdown) in the broker rather than in a worker; publisher confirms on
    every publish of ours and Celery's. No visibility timeout: RabbitMQ gives a delivery back
    when its consumer's connection closes, and the job's lease absorbs the second copy."""
    return {
        "broker_transport_options": {"confirm_publish": True},
        "task_queues": [amqp_queue(name) for name in band_queues(settings.queue)],
        "task_default_exchange_type": "topic",
        "task_default_queue_type": "quorum",
        "task_create_missing_queue_type": "quorum",
        "task_create_missing_queue_exchange_type": "topic",
        # Quorum queues have no global QoS: the prefetch is per consumer (one per band).
        "worker_detect_quorum_queues": True,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """The runtime defaults: late acks, prefetch 1, JSON only, our own results in Redis."""
    broker = settings.effective_broker_url
    scheme = broker.split("://", 1)[0]
    transport = {
        # Our subclass of kombu's Redis transport survives garbage on the queue.
        "redis": "worker.runtime.transport:Transport",
        "rediss": "worker.runtime.transport:Transport",
        "sentinel": SENTINEL_TRANSPORT,
    }.get(scheme)
    config: dict[str, Any] = {
        "broker_transport": transport,
        "broker_url": broker,
        **_sentinel_config(settings, scheme),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": (
            redis_transport_options(settings) if is_redis_broker(broker) else {}
        ),
        "broker_pool_limit": 10,
        "result_backend": None,
        # No result backend: Celery's stand-in for none holds no state, so one instance can
        # serve every greenlet. Left unsaid, Celery keeps one per thread, which under gevent
        # is one per task: a new backend object for each job (4% of a short job's CPU).
        "result_backend_thread_safe": True,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        "task_default_exchange": settings.queue,
        "task_default_routing_key": settings.queue,
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "worker_consumer": "worker.runtime.task:Consumer",
        "worker_concurrency": settings.concurrency,
        # A green pool is chosen by `-P` (`llm-worker run` passes it after patching), never by
        # this setting: a worker that read it would run gevent unpatched (Celery warns so at
        # every start). Plain `celery -A worker.celery_app worker` needs `-P gevent`.
        **({} if settings.pool in GREEN_POOLS else {"worker_pool": settings.pool}),
        "include": ["worker.runtime.task", "worker.runtime.sweeper"],
        "enable_utc": True,
    }
    if is_amqp_broker(broker):
        config.update(amqp_config(settings))
    return config


def _sentinel_config(settings: Settings, scheme: str) -> dict[str, Any]:
    """Under Sentinel: the Redis password (kept out of the URL, which Celery prints) and,
    merged into the transport options by :func:`celery_config`, the service name and the
    Sentinels' password."""
    if scheme == "sentinel" and settings.redis_password is not None:
        return {"broker_password": settings.redis_password.get_secret_value()}
    return {}


SENTINEL_TRANSPORT = "worker.runtime.transport:SentinelTransport"


def sentinel_transport_options(settings: Settings) -> dict[str, Any]:
    if not settings.effective_broker_url.startswith("sentinel://"):
        return {}
    # kombu treats the Sentinels of the URL as failover alternates: after a lost connection
    # it switches to the next one, resolving the transport again from its scheme, which
    # replaced ours with kombu's stock Sentinel transport (measured: the worker then consumed
    # without our inbox give-back, restore schedule and liveness, and a message was stranded
    # in an inbox for good). The alias makes that switch land on ours.
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES["sentinel"] = SENTINEL_TRANSPORT
    options: dict[str, Any] = {"master_name": settings.redis_sentinel_master}
    kwargs: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
    if settings.redis_sentinel_password is not None:
        kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
    options["sentinel_kwargs"] = kwargs
    return options


class LLMWorkerCelery(Celery):
    settings: Settings | None = None

    # Celery still calls ``on_configure`` when it is a method (its pre-4.0 hook), before it
    # reads the configuration: the one place to build it lazily.
    def on_configure(self) -> None:  # type: ignore[override]
        settings = self.settings or load_settings()
        self.settings = settings
        self.config_from_object(celery_config(settings))

    def use_settings(self, settings: Settings) -> None:
        """Reconfigure with explicit settings (tests and the CLI)."""
        self.settings = settings
        self.config_from_object(celery_config(settings), force=True)


app = LLMWorkerCelery("llm-worker")
celery = app


@signals.worker_init.connect
def _cooperative_kombu_sleep(**_: Any) -> None:
    """kombu.utils.functional binds ``time.sleep`` when it is first imported, which Celery's
    start reaches before gevent (or eventlet) patches ``time``: kombu's broker reconnect loop
    (``retry_over_time``, 2, 4, ... up to 30 s between attempts) then froze every greenlet of
    the worker. Measured in a Redis outage: lease renewals, the cancel listener and running
    streams all stood still for 40 s. Rebind it to the (patched) ``time.sleep``."""
    import time

    from kombu.utils import functional

    if getattr(functional, "sleep", time.sleep) is not time.sleep:
        functional.sleep = time.sleep  # type: ignore[attr-defined]


@signals.worker_init.connect
def _no_idle_wait_on_the_events_connection(**_: Any) -> None:
    """Celery's loop for gevent and eventlet (``synloop``) drains the event dispatcher's
    connection after every read of the task connection, to consume its broker heartbeats, and
    waits up to 0.1 s there for frames that nobody sends: on AMQP every message cost 0.1 s of
    the consumer (measured: 60 deliveries started over 6 s, one per 102 ms; with threads, all
    at once). Read what is there without waiting. (Redis transports have no such connection.)
    """
    from celery.worker import loops

    drain = getattr(loops, "_quick_drain", None)  # a private helper: absent, nothing to do
    if drain is None or getattr(drain, "llmw_no_wait", False):
        return

    def quick_drain(connection: Any, timeout: float = 0.0) -> None:
        drain(connection, timeout=0)

    quick_drain.llmw_no_wait = True  # type: ignore[attr-defined]
    setattr(loops, "_quick_drain", quick_drain)  # noqa: B010 (untyped in the stubs)


@signals.worker_init.connect
def _refuse_redis_cluster(**_: Any) -> None:
    """A worker on a Redis Cluster stops at start, saying why (not at its first job)."""
    from worker.connections.clients import RedisClusterUnsupported, check_not_cluster

    try:
        check_not_cluster(app.settings or load_settings())
    except RedisClusterUnsupported as exc:
        # SystemExit: Celery logs and swallows an Exception raised by a signal receiver.
        raise SystemExit(f"llm-worker: {exc}") from None


@signals.setup_logging.connect
def _configure_logging(**_: Any) -> None:
    """A worker started with plain ``celery -A worker.celery_app worker`` logs as ``llm-worker
    run`` does: our level and format, secrets redacted (Celery's own setup is skipped when this
    signal has a receiver). Without it every job's INFO line was printed unredacted."""
    from worker.logs import configure_logging

    configure_logging(app.settings or load_settings())


@signals.celeryd_after_setup.connect
def _consume_every_band(instance: Any = None, **_: Any) -> None:
    """On AMQP a worker consumes its queues' priority bands too: ``-Q llmw`` (or ``llm-worker
    run``) means ``llmw.high``, ``llmw`` and ``llmw.low``. Celery's documented place to add
    queues to whatever ``-Q`` selected."""
    settings = app.settings or load_settings()
    if instance is None or not is_amqp_broker(settings.effective_broker_url):
        return
    queues = instance.app.amqp.queues
    for name in list(queues.consume_from):
        if band_of(name) is not None:
            continue
        for band in band_queues(name):
            queues.select_add(queues[band] if band in queues else amqp_queue(band))
