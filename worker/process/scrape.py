"""Queue-wide gauges read from Redis when ``/metrics`` is scraped, by the serving process.

Custom collectors do not work in prometheus-client's multiprocess mode (prefork), so the
serving process sets ordinary gauges just before it renders them; under every pool the same
code runs in the one process that serves HTTP.

- ``llm_worker_queue_depth{state="waiting"}``: ``LLEN`` of the queue's list and of kombu's
  priority lists (``{queue}\\x06\\x16{priority}``), plus the jobs filed in its traffic classes.
- ``llm_worker_queue_depth{state="unacked"}``: kombu keeps every delivered, unacknowledged
  message of *every* queue of the broker database in one hash (``unacked``: delivery tag ->
  ``[message, exchange, routing_key]``). We count the entries whose routing key is our queue
  (Celery routes each of our queues by its own name). The values hold whole requests, so
  each tag is read once and remembered: a scrape costs one ``HKEYS`` plus the new entries.
- ``llm_worker_queue_class_depth`` and ``llm_worker_queue_oldest_age_seconds``, by priority
  and tenant (folded by :func:`worker.metrics.tenant_label`): the traffic-class lists
  (:class:`worker.keys.TrafficKeys`), their ``LLEN`` and the submission time in the headers
  of their oldest message; at most ``MAX_TENANTS_READ`` tenants per priority are read.
  Messages not yet filed (still on the kombu lists) count as waiting, not in a class.
- ``llm_worker_dead_letters``: ``XLEN`` of the dead-letter stream.
- ``llm_worker_queue_jobs_submitted_total``: the Redis counter (per queue and model) that
  every producer adds to, mirrored into a counter (it only moves forward).
- ``llm_worker_ready``: Redis answers and the consumer is consuming.
- ``llm_worker_tenant_spend_usd`` / ``llm_worker_tenant_budget_usd``: each budgeted tenant's
  spend counters (``Keys.spend``) for the current UTC day and month, and its budgets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import orjson
import redis
import structlog
from kombu.transport import redis as kombu_redis

from worker import metrics as m
from worker.accounting.pricing import PICO_PER_USD
from worker.keys import Keys, TrafficKeys
from worker.settings import Settings

log = structlog.get_logger("worker.process.scrape")

#: kombu's names (``Channel.unacked_key``, ``Channel.sep``, ``PRIORITY_STEPS``); we leave
#: the transport's defaults alone, so these are the keys it writes.
UNACKED_KEY = "unacked"
PRIORITY_SEP = "\x06\x16"


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting messages, one per kombu priority step."""
    return [
        queue if pri == 0 else f"{queue}{PRIORITY_SEP}{pri}" for pri in kombu_redis.PRIORITY_STEPS
    ]


#: A bound on a scrape's work: tenants read per priority (the busiest are not chosen; the
#: first by virtual time, i.e. those served next).
MAX_TENANTS_READ = 200
PRIORITIES = range(10)


def submitted_at(raw: bytes | None) -> float | None:
    """The ``llmw_submitted_at`` header of a queued message, or None."""
    if raw is None:
        return None
    try:
        value = orjson.loads(raw)["headers"]["llmw_submitted_at"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def class_gauges(
    broker: redis.Redis[bytes], queue: str, now: float
) -> dict[tuple[str, str], tuple[int, float]]:
    """``(priority, tenant label) -> (waiting jobs, oldest age in seconds)`` of a queue's
    traffic classes; tenants folded into one label add their depths and keep the oldest."""
    keys = TrafficKeys(queue)
    pipe = broker.pipeline(transaction=False)
    for priority in PRIORITIES:
        pipe.zrange(keys.turns(priority), 0, MAX_TENANTS_READ - 1)
    classes = [
        (priority, tenant.decode())
        for priority, tenants in zip(PRIORITIES, pipe.execute(), strict=True)
        for tenant in tenants
    ]
    for priority, tenant in classes:
        pipe.llen(keys.waiting(priority, tenant))
        pipe.lindex(keys.waiting(priority, tenant), -1)
    replies = pipe.execute()
    gauges: dict[tuple[str, str], tuple[int, float]] = {}
    for index, (priority, tenant) in enumerate(classes):
        depth, oldest = int(replies[2 * index]), submitted_at(replies[2 * index + 1])
        age = max(0.0, now - oldest) if oldest is not None else 0.0
        label = (str(priority), m.tenant_label(tenant))
        before_depth, before_age = gauges.get(label, (0, 0.0))
        gauges[label] = (before_depth + depth, max(before_age, age))
    return gauges


def routing_key(raw: bytes) -> str | None:
    """The routing key of one ``unacked`` entry, or None when it is not kombu's shape."""
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str):
        return entry[2]
    return None


class ScrapeGauges:
    """Refreshes the queue-wide gauges; one per serving process, safe across threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        results: redis.Redis[bytes],
        broker: redis.Redis[bytes] | None,
        alive: Callable[[], bool],
    ) -> None:
        m.add_model_labels(settings.catalogue.label_names())
        m.add_tenant_labels(settings.tenant_names())
        self.budgets = settings.budgets
        self.queue = settings.queue
        self.keys = Keys(settings.key_prefix)
        self.results = results
        self.broker = broker
        self.alive = alive
        self._lock = threading.Lock()
        self._tag_queues: dict[bytes, str | None] = {}
        self._submitted_seen: dict[str, float] = {}
        self._classes_set: set[tuple[str, str]] = set()

    def ready(self) -> bool:
        """Redis answers and the consumer is consuming; also sets ``llm_worker_ready``."""
        try:
            redis_ok = bool(self.results.ping())
        except redis.RedisError:
            redis_ok = False
        ok = redis_ok and self.alive()
        m.WORKER_READY.set(1 if ok else 0)
        return ok

    def refresh(self) -> None:
        """Read Redis and set every queue-wide gauge; on a Redis error the last values stay."""
        with self._lock:
            # A worker that is not consuming still reports the backlog it leaves behind.
            self.ready()
            try:
                if self.broker is not None:
                    waiting, unacked = self._queue_depth(self.broker)
                    classes = class_gauges(self.broker, self.queue, time.time())
                    waiting += sum(depth for depth, _ in classes.values())
                    m.QUEUE_DEPTH.labels(self.queue, "waiting").set(waiting)
                    m.QUEUE_DEPTH.labels(self.queue, "unacked").set(unacked)
                    self._set_classes(classes)
                m.DEAD_LETTERS.set(int(self.results.xlen(self.keys.dead_letters)))
                m.OUTBOX_PENDING.labels(self.queue).set(
                    int(self.results.zcard(self.keys.outbox(self.queue)))
                )
                self._mirror_submitted()
                self._spend_against_budgets()
            except redis.RedisError as exc:
                log.warning("scrape_refresh_failed", error=f"{type(exc).__name__}: {exc}"[:200])

    def _set_classes(self, classes: dict[tuple[str, str], tuple[int, float]]) -> None:
        for priority, tenant in self._classes_set - classes.keys():  # emptied: no series
            m.QUEUE_CLASS_DEPTH.remove(self.queue, priority, tenant)
            m.QUEUE_OLDEST_AGE.remove(self.queue, priority, tenant)
        for (priority, tenant), (depth, age) in classes.items():
            m.QUEUE_CLASS_DEPTH.labels(self.queue, priority, tenant).set(depth)
            m.QUEUE_OLDEST_AGE.labels(self.queue, priority, tenant).set(age)
        self._classes_set = set(classes)

    def _queue_depth(self, broker: redis.Redis[bytes]) -> tuple[int, int]:
        pipe = broker.pipeline(transaction=False)
        for name in queue_lists(self.queue):
            pipe.llen(name)
        pipe.hkeys(UNACKED_KEY)
        *lengths, tags = pipe.execute()
        current = set(tags)
        for gone in self._tag_queues.keys() - current:
            del self._tag_queues[gone]
        new = [tag for tag in current if tag not in self._tag_queues]
        if new:
            for tag, raw in zip(new, broker.hmget(UNACKED_KEY, new), strict=True):
                if raw is not None:  # acked between HKEYS and HMGET: gone, not ours to count
                    self._tag_queues[tag] = routing_key(raw)
        unacked = sum(1 for tag in current if self._tag_queues.get(tag) == self.queue)
        return sum(int(n) for n in lengths), unacked

    def _spend_against_budgets(self) -> None:
        """Each budgeted tenant's spend this UTC day and month, beside its budget."""
        if not self.budgets:
            return
        now = time.time()
        rows = [
            (tenant, name, period, limit)
            for tenant, budget in self.budgets.items()
            for name, period, limit in budget.limits(now)
        ]
        values = self.results.mget([self.keys.spend(t, period) for t, _n, period, _l in rows])
        for (tenant, name, _period, limit), value in zip(rows, values, strict=True):
            m.TENANT_SPEND.labels(tenant, name).set(int(value or 0) / PICO_PER_USD)
            m.TENANT_BUDGET.labels(tenant, name).set(limit / PICO_PER_USD)

    def _mirror_submitted(self) -> None:
        counts = self.results.hgetall(self.keys.submitted_counts(self.queue))
        for raw_field, raw_count in counts.items():
            # Fields are a model label, or ``<model>|<tenant>`` for a tenant's jobs.
            field, count = raw_field.decode(), float(raw_count)
            model, sep, tenant = field.partition("|")
            seen = self._submitted_seen.get(field, 0.0)
            if count > seen:
                m.QUEUE_JOBS_SUBMITTED.labels(
                    self.queue, model, tenant if sep else m.NO_TENANT
                ).inc(count - seen)
            # A counter never goes down: after a reset in Redis, count from the new value.
            self._submitted_seen[field] = count
