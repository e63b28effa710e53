"""The outbox: with a broker other than the results Redis, a job exists if and only if its
message is, or will be, on the queue.

One Redis step cannot both create the record and enqueue on another server, so:

1. ``submit.lua`` (its outbox form) creates the record and, in the same step, keeps the job's
   message in the queue's outbox (``Keys.outbox``, ``Keys.outbox_message``);
2. the producer publishes it and waits for the broker's confirmation (AMQP publisher
   confirms; a Redis broker's reply to ``LPUSH``);
3. then takes it out of the outbox (:meth:`Outbox.mark_sent`).

A producer that dies between 1 and 3, or a broker that is down, leaves the message in the
outbox: every worker runs a sweeper (:mod:`worker.runtime.sweeper`) that publishes again the
messages waiting longer than ``OUTBOX_GRACE_S``, one worker at a time. A resubmit of an id
still in the outbox publishes it again at once.

The gateway's fast path (:mod:`worker.gateway.fast_path`) uses the same outbox with the broker
on the results Redis: its job's message is kept there while the gateway runs the job itself,
and taken out when the job ends (or pushed onto the queue when the gateway hands it back); if
the gateway dies, its lease lapses and a sweeper publishes the message.

A message can thus be published twice (a producer slower than the grace, a confirmation lost
with its connection, a gateway that hands a job back as a sweeper publishes it); the second
delivery meets the job's lease (running) or its end (ended) and does not run it again.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import orjson
import redis

from worker.broker import (
    TASK_NAME,
    amqp_queue,
    band_queue,
    is_amqp_broker,
    is_redis_broker,
    task_body,
    task_headers,
    task_message,
)
from worker.connections.clients import redis_client
from worker.keys import Keys
from worker.settings import Settings
from worker.store import load_lua, text

#: How long a producer waits for a broker connection, and for one publish's confirmation.
CONNECT_TIMEOUT_S = 5.0
CONFIRM_TIMEOUT_S = 10.0
#: A sweep hands out at most this many jobs (the rest wait for the next tick).
SWEEP_BATCH = 2000
#: Publishes sent before their confirmations are read: the broker's acknowledgements must not
#: fill our socket while we write (it would stop reading us in turn).
CONFIRM_WINDOW = 1000


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One job's message as the outbox keeps it."""

    job_id: str
    payload: dict[str, Any]
    priority: int | None = None

    def dumps(self) -> bytes:
        return orjson.dumps({"payload": self.payload, "priority": self.priority})

    @classmethod
    def loads(cls, job_id: str, raw: Any) -> OutboxItem | None:
        """The item kept for ``job_id``; None when it is missing or not ours."""
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("payload"), dict):
            return None
        priority = data.get("priority")
        return cls(job_id, data["payload"], priority if isinstance(priority, int) else None)


class Outbox:
    """One queue's outbox in the results Redis (producers and sweepers alike)."""

    def __init__(self, client: redis.Redis[bytes], keys: Keys, queue: str) -> None:
        self.redis = client
        self.keys = keys
        self.queue = queue
        self.key = keys.outbox(queue)
        self._due = client.register_script(load_lua("outbox_due.lua"))

    def mark_sent(self, job_ids: Sequence[str]) -> None:
        """The broker confirmed these jobs' messages: they leave the outbox."""
        if not job_ids:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.key, *job_ids)
        pipe.delete(*(self.keys.outbox_message(job_id) for job_id in job_ids))
        pipe.execute()

    def due(self, *, grace_s: float, lock_ttl_s: float, token: str | None = None) -> list[str]:
        """The jobs to publish again (see ``outbox_due.lua``); empty when another worker holds
        this tick's sweep lock."""
        raw = self._due(
            keys=[self.keys.outbox_lock(self.queue), self.key],
            args=[token or uuid.uuid4().hex, max(1, int(lock_ttl_s * 1000)), grace_s, SWEEP_BATCH],
        )
        return [text(job_id) for job_id in raw]

    def pending(self, job_ids: Sequence[str]) -> tuple[list[OutboxItem], list[str]]:
        """Of ``job_ids``: the items to publish, and the ids whose entry is stale and should
        just go (the job ended, its record or message expired).

        To publish: a job still queued, and a running job whose lease lapsed (its runner
        died with no message on the queue: the gateway's fast path, or a producer that died
        between publish and confirmation; a second copy meets the job's lease or end). A
        running job whose lease is alive is neither: its entry stays, looked at again after
        another grace, until the job ends."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), ["state", "lease_until"])
            pipe.get(self.keys.outbox_message(job_id))
        replies = pipe.execute()
        seconds, micros = replies[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000  # the clock leases are kept in
        items: list[OutboxItem] = []
        stale: list[str] = []
        for index, job_id in enumerate(job_ids):
            (state, lease_until), raw = replies[1 + 2 * index], replies[2 + 2 * index]
            item = OutboxItem.loads(job_id, raw)
            state_text = text(state) if state is not None else None
            if item is None or state_text not in {"queued", "running"}:
                stale.append(job_id)
            elif state_text == "queued" or int(text(lease_until or b"0") or 0) <= now_ms:
                items.append(item)
        return items, stale

    def size(self) -> int:
        return int(self.redis.zcard(self.key))


class Publisher(Protocol):
    """Sends outbox items to the broker and says which the broker confirmed."""

    def publish(self, items: Sequence[OutboxItem]) -> tuple[list[str], BaseException | None]:
        """Publish in order; the confirmed job ids, and the error that stopped the rest."""
        ...

    def close(self) -> None: ...


class RedisListPublisher:
    """A Redis broker that is not the results Redis: ``LPUSH`` the envelope kombu reads."""

    def __init__(self, client: redis.Redis[bytes], queue: str) -> None:
        self.redis = client
        self.queue = queue

    def publish(self, items: Sequence[OutboxItem]) -> tuple[list[str], BaseException | None]:
        if not items:
            return [], None
        pipe = self.redis.pipeline(transaction=False)
        for item in items:
            pipe.lpush(self.queue, task_message(item.job_id, item.payload, queue=self.queue))
        try:
            pipe.execute()
        except redis.RedisError as exc:
            return [], exc
        return [item.job_id for item in items], None

    def close(self) -> None:
        self.redis.close()


class AmqpPublisher:
    """Publishes to RabbitMQ with publisher confirms: a batch is sent whole, then its
    confirmations are awaited together (one round trip per batch, not per message; the broker
    acknowledges several at once). One connection and channel per publisher, opened on first
    use and again after an error. Thread-safe (one publish at a time)."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self._lock = threading.Lock()
        self._connection: Any = None
        self._channel: Any = None
        self._declared: set[str] = set()
        #: Delivery tags on the current channel: the broker numbers our publishes from 1.
        self._published = 0
        #: Publishes awaiting their confirmation: delivery tag -> job id; every tag below
        #: ``_floor`` is settled (the broker confirms in order, often several at once).
        self._pending: dict[int, str] = {}
        self._floor = 1
        self._confirmed: list[str] = []
        self._refused: list[str] = []

    def _ensure(self) -> Any:
        if self._channel is None:
            from kombu import Connection

            connection = Connection(self.url, connect_timeout=CONNECT_TIMEOUT_S)
            connection.ensure_connection(max_retries=1)
            # py-amqp's channel (kombu's stubs know only the generic one).
            channel: Any = connection.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            self._connection, self._channel = connection, channel
            self._published = 0
            self._floor = 1
            self._declared = set()
        return self._channel

    def _settle(self, tag: int, multiple: bool, into: list[str]) -> None:
        if multiple:
            tags = range(self._floor, tag + 1)
            self._floor = max(self._floor, tag + 1)
        else:
            tags = range(tag, tag + 1)
        for settled in tags:
            job_id = self._pending.pop(settled, None)
            if job_id is not None:
                into.append(job_id)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, self._confirmed)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, self._refused)

    def publish(self, items: Sequence[OutboxItem]) -> tuple[list[str], BaseException | None]:
        with self._lock:
            self._pending, self._confirmed, self._refused = {}, [], []
            try:
                self._publish(items)
            except Exception as exc:  # any failure: the unconfirmed stay in the outbox
                self._reset()
                return list(self._confirmed), exc
            if self._refused:
                return list(self._confirmed), RuntimeError(
                    f"the broker refused {len(self._refused)} message(s) (basic.nack)"
                )
            return list(self._confirmed), None

    def _publish(self, items: Sequence[OutboxItem]) -> None:
        channel = self._ensure()
        for item in items:
            name = band_queue(self.queue, item.priority)
            if name not in self._declared:
                # An AMQP broker confirms a message that no queue took, and drops it: the
                # queue is declared (as the workers declare it) before the first publish.
                amqp_queue(name)(channel).declare()
                self._declared.add(name)
            message = channel.prepare_message(
                task_body(item.payload),
                content_type="application/json",
                content_encoding="utf-8",
                headers=task_headers(item.job_id, item.payload),
                properties={"correlation_id": item.job_id, "reply_to": "", "delivery_mode": 2},
            )
            channel._basic_publish(message, exchange="", routing_key=name)
            self._published += 1
            self._pending[self._published] = item.job_id
            if len(self._pending) >= CONFIRM_WINDOW:
                self._await_confirms()
        self._await_confirms()

    def _await_confirms(self) -> None:
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{len(self._pending)} publish(es) unconfirmed after {CONFIRM_TIMEOUT_S:g} s"
                )
            self._connection.drain_events(timeout=left)

    def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._pending = {}
        if connection is not None:
            # Closing a broken connection: nothing more to do if that fails too.
            with contextlib.suppress(Exception):
                connection.close()

    def close(self) -> None:
        with self._lock:
            self._reset()


class CeleryPublisher:
    """Any other broker Celery knows (``memory://``): Celery's own publish."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def publish(self, items: Sequence[OutboxItem]) -> tuple[list[str], BaseException | None]:
        from worker.celery_app import app

        if app.settings is None:
            app.use_settings(self.settings)
        confirmed: list[str] = []
        try:
            for item in items:
                app.send_task(
                    TASK_NAME, args=[item.payload], task_id=item.job_id, queue=self.settings.queue
                )
                confirmed.append(item.job_id)
        except Exception as exc:  # any failure: the rest stay in the outbox
            return confirmed, exc
        return confirmed, None

    def close(self) -> None:
        pass


def make_publisher(settings: Settings) -> Publisher:
    """The publisher for a broker other than the results Redis."""
    url = settings.effective_broker_url
    if is_amqp_broker(url):
        return AmqpPublisher(url, settings.queue)
    if is_redis_broker(url):
        # One try per publish (the sweeper publishes again); under Sentinel, the master of now.
        client = redis_client(
            settings,
            url=url,
            retry_s=0,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=CONFIRM_TIMEOUT_S,
        )
        return RedisListPublisher(client, settings.queue)
    return CeleryPublisher(settings)


def error_summary(exc: BaseException, url: str) -> str:
    """What may be logged of a publish error: its type and message, cut short, with the
    broker's password (should a client quote its URL) blanked out."""
    detail = str(exc)[:300]
    password = urlsplit(url).password
    if password:
        detail = detail.replace(password, "***").replace(quote(password, safe=""), "***")
    return f"{type(exc).__name__}: {detail}"
