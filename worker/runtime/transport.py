"""kombu's Redis transport, made to lose no message when its worker is killed, hardened
against bytes on the queue that are not a message, and reporting each poll of the worker's
queues to :mod:`worker.process.liveness`.

**No message lost between the queue and ``unacked``.** kombu takes a message with ``BRPOP``
and records it in ``unacked`` with a second command; a worker killed in between (or whose
connection dropped with the reply unread) lost the message. Here the message is *moved*
from its queue into this worker's inbox list (``<queue key>\x06\x16inbox\x06\x16<host>:<pid>``)
in one step, by a script (every queue and priority, in kombu's order) or, when all are empty,
a blocking ``BRPOPLPUSH`` on the first; it leaves the inbox in the same ``MULTI`` that writes
it to ``unacked``. Inboxes are listed in ``_kombu.inboxes`` and kept alive by a key each
worker refreshes on its restore schedule; a worker gives back what its own inbox holds when
its channel starts (a delivery that failed half-way) and what the inbox of a worker whose key
expired holds (it died). A message given back may be delivered twice; the job's lease and
end absorb that. Needs Redis >= 2.2 for the commands; kombu's ``global_keyprefix`` option
falls back to kombu's own ``BRPOP``.

**Traffic classes.** The fetch script (``worker/lua/fetch.lua``) first files what waits on
the queue's kombu lists (new jobs, restored and requeued messages) into per-priority,
per-tenant lists by the message's headers, then takes the next message by priority (with
aging), fair share between tenants and FIFO within a tenant: see docs/traffic-classes.md.
The blocking wait, when the last fetch found nothing at all, stays a ``BRPOPLPUSH`` on the
queue's list, which every producer pushes onto.

**Items that are not messages.** kombu parses a popped item inside the consumer's event
loop; an item that is not a broker envelope (not JSON, or JSON of the wrong shape) raises out
of the loop and Celery stops the worker as "unrecoverable". We record it as a dead letter,
drop it, and carry on consuming.
"""

# kombu's transport internals (_queue_cycle, _q_for_pri, connection_errors, ...) carry no
# type hints: attribute checks are off for this module.
# mypy: disable-error-code="attr-defined,misc"
from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from time import monotonic, sleep, time
from typing import Any

import structlog
from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from orjson import dumps as json_bytes

from worker.connections.clients import SentinelConnection
from worker.keys import TrafficKeys
from worker.process.liveness import STATE
from worker.store import load_lua

log = structlog.get_logger("worker.runtime.transport")

#: How long a poll waits while every prefetch slot is taken (see ``MultiChannelPoller.get``).
SATURATED_POLL_S = 0.005
#: The most messages one fetch takes (never more than the free prefetch slots). Under load
#: each round trip of the consumer waits for every busy greenlet to run once: one message per
#: fetch started a burst of 300 streams over 3 s; a batch pays the two round trips once.
FETCH_BATCH = 32


def strip_comments(script: str) -> str:
    """A Lua script without its comment lines: the fetch goes out with every poll."""
    return "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))


#: Files the queue's waiting messages by class, and moves the next one into its inbox.
_FETCH = strip_comments(load_lua("fetch.lua"))
#: The most messages one fetch files from one kombu list (a bound on the script's time).
FILE_LIMIT = 100
#: Gives an inbox back to its queue (oldest first, to the consuming end) and forgets it.
#: KEYS[1] inbox  KEYS[2] its queue key  KEYS[3] the inbox registry
_GIVE_BACK = """
local moved = 0
while redis.call('RPOPLPUSH', KEYS[1], KEYS[2]) do moved = moved + 1 end
redis.call('SREM', KEYS[3], KEYS[1])
return moved
"""
INBOXES_KEY = "_kombu.inboxes"
_INBOX = "inbox"
_ALIVE = "alive"
CONSUMER_ID = f"{socket.gethostname()}:{os.getpid()}"
#: Tests only: hold a fetched message this long before delivering it, so that a test can kill
#: the worker inside the window this module closes.
_TEST_PAUSE_S = float(os.environ.get("LLM_WORKER_TEST_PAUSE_AFTER_FETCH_S") or 0)


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: Any) -> None:
        """kombu's ``append``: ``unacked`` and its index, unless the fetch wrote them already
        (:meth:`Channel._deliver_fetched`, for every message of a fetch in one ``MULTI``)."""
        recorded = self.channel._recorded
        if delivery_tag in recorded:
            recorded.discard(delivery_tag)
        else:
            delivery = message.delivery_info
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()}).hset(
                    self.unacked_key,
                    delivery_tag,
                    dumps([message._raw, delivery["exchange"], delivery["routing_key"]]),
                )
                pipe.execute()
        super(kombu_redis.QoS, self).append(message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    # Traffic classes (set from broker_transport_options by worker.celery_app).
    from_transport_options = (
        *kombu_redis.Channel.from_transport_options,
        "priority_aging_s",
        "tenant_weights",
    )
    priority_aging_s: float = 60.0
    tenant_weights: dict[str, float] = {}  # noqa: RUF012 (replaced, never mutated)
    _fetch_blocks = False  # the last non-blocking fetch found every queue empty
    _fetch_command = ""
    _fetch_key = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._own_inboxes_checked: set[str] = set()
        #: Delivery tags whose ``unacked`` record the fetch wrote, until QoS.append sees them.
        self._recorded: set[str] = set()

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu builds a new ``redis.Redis`` object for every ``unacked`` write and ack (7%
        of a short job's CPU in a py-spy profile of bench.overhead); one per channel serves
        them all (it is thread-safe; connections come from the channel's pool either way)."""
        if client:
            yield client
            return
        shared = self.__dict__.get("_shared_client")
        if shared is None:
            shared = self.__dict__["_shared_client"] = self._create_client()
        yield shared

    def inbox(self, key: str) -> str:
        return f"{key}{self.sep}{_INBOX}{self.sep}{CONSUMER_ID}"

    def _brpop_start(self, timeout: Any = None) -> None:
        if self.global_keyprefix:
            super()._brpop_start(timeout)
        else:
            self._fetch_start(timeout)
        if getattr(self, "_in_poll", None):  # a fetch went out for at least one queue
            STATE.consumed()

    def _fetch_start(self, timeout: Any) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        bases = [TrafficKeys(queue).base for _ in self.priority_steps for queue in queues]
        self._give_back_own_leftovers(keys)
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        if self._fetch_blocks:
            self._fetch_command, self._fetch_key = "BRPOPLPUSH", keys[0]
            args: list[Any] = ["BRPOPLPUSH", keys[0], self.inbox(keys[0]), timeout or 0]
        else:
            self._fetch_command = "EVAL"
            most = min(FETCH_BATCH, self.qos.can_consume_max_estimate() or FETCH_BATCH)
            args = [
                "EVAL",
                _FETCH,
                2 * len(keys),
                *keys,
                *(self.inbox(k) for k in keys),
                float(self.priority_aging_s),
                json_bytes(self.tenant_weights),
                FILE_LIMIT,
                *bases,
                max(1, most),
            ]
        self.client.connection.send_command(*args)

    def _brpop_read(self, **options: Any) -> Any:
        if self.global_keyprefix:
            return self._read_guarded(lambda: super(Channel, self)._brpop_read(**options))
        return self._read_guarded(lambda: self._fetch_read(**options))

    def _fetch_read(self, **options: Any) -> bool:
        command = self._fetch_command
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if command == "BRPOPLPUSH":
                self._fetch_blocks = False  # after a blocking wait, look at every queue again
                if reply is None:
                    raise Empty()
                key, items = self._fetch_key, [reply]
            else:
                if not reply:
                    self._fetch_blocks = True
                    raise Empty()
                key, items = bytes_to_str(reply[0]), list(reply[1:])
            if _TEST_PAUSE_S:
                sleep(_TEST_PAUSE_S)
            dest = key.rsplit(self.sep, 1)[0] if self.sep in key else key
            self._queue_cycle.rotate(dest)
            self._deliver_fetched(self.inbox(key), dest, items)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_fetched(self, inbox: str, dest: str, items: list[bytes]) -> None:
        """Record every fetched message in ``unacked`` and take it out of the inbox, in one
        ``MULTI`` for them all, then hand each to the consumer. An item that is not a message
        is dead-lettered and dropped, the others go on."""
        ready: list[tuple[str, Any]] = []
        tags: dict[str, float] = {}
        records: dict[str, str] = {}
        for item in items:
            try:
                payload = loads(bytes_to_str(item))
                properties = payload["properties"]
                tag = properties["delivery_tag"]
                delivery = properties["delivery_info"]
                records[tag] = dumps([payload, delivery["exchange"], delivery["routing_key"]])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                _not_a_message(exc)
                continue
            tags[tag] = time()
            ready.append((tag, payload))
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            if records:
                pipe.zadd(self.unacked_index_key, tags)
                pipe.hset(self.unacked_key, mapping=records)
            for item in items:  # delivered or dropped: none may come back from the inbox
                pipe.lrem(inbox, 1, item)
            pipe.execute()
        self._recorded.update(tags)
        for tag, payload in ready:
            try:
                self.connection._deliver(payload, dest)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                _not_a_message(exc)
                self._recorded.discard(tag)
                with self.conn_or_acquire() as client:
                    self.qos._remove_from_indices(tag, client.pipeline()).execute()

    def _read_guarded(self, read: Any) -> Any:
        try:
            return read()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # kombu's own BRPOP path (a global key prefix): the item is already off the queue.
            _not_a_message(exc)
            return True

    def _give_back_own_leftovers(self, keys: list[str]) -> None:
        """Once per key and channel: what our inbox holds is from a delivery that failed
        half-way (a connection lost before the ``MULTI``); it goes back to its queue."""
        new = [k for k in keys if k not in self._own_inboxes_checked]
        if not new:
            return
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            for key in new:
                inbox = self.inbox(key)
                pipe.eval(_GIVE_BACK, 3, inbox, key, INBOXES_KEY)  # (which unlists it)
                pipe.sadd(INBOXES_KEY, inbox)
                pipe.set(f"{inbox}{self.sep}{_ALIVE}", 1, ex=self._inbox_ttl_s())
            pipe.execute()
        self._own_inboxes_checked.update(new)

    def keep_deliveries(self) -> None:
        """Refresh the visibility clock of every message this channel holds unacked (running,
        parked behind a lease, or held for a countdown), as SQS's ChangeMessageVisibility does:
        only a delivery whose worker stopped refreshing it comes back after the visibility
        timeout, however long its job runs. ``XX``: a tag acked meanwhile is not re-added."""
        qos = self.__dict__.get("_qos")
        if qos is None:
            return
        try:
            tags = [tag for tag in list(qos._delivered) if tag not in qos._dirty]
        except RuntimeError:  # changed by an ack in another thread: next time
            return
        if tags:
            with self.conn_or_acquire() as client:
                client.zadd(self.unacked_index_key, dict.fromkeys(tags, time()), xx=True)

    def give_back_stranded(self) -> None:
        """On the restore schedule, with no fetch of this channel in flight: its inboxes
        should be empty. What one holds was moved there by a fetch whose reply never reached
        us, on a connection that was then re-established without restarting the channel
        (measured: a message stranded for good when a Sentinel failover cut a fetch), and it
        goes back to its queue. At worst a message is delivered twice; its lease and end
        absorb that."""
        if getattr(self, "_in_poll", None):  # (a fetch's reply is handled in one go)
            return
        keys = sorted(self._own_inboxes_checked)
        if not keys:
            return
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.llen(self.inbox(key))
            lengths = pipe.execute()
            for key, length in zip(keys, lengths, strict=True):
                if not length:
                    continue
                inbox = self.inbox(key)
                pipe = client.pipeline()
                pipe.eval(_GIVE_BACK, 3, inbox, key, INBOXES_KEY)  # (which unlists it)
                pipe.sadd(INBOXES_KEY, inbox)
                moved = pipe.execute()[0]
                if moved:
                    log.warning("inbox_given_back", inbox=inbox, messages=int(moved))

    def _inbox_ttl_s(self) -> int:
        # Refreshed every unacked_restore_interval (1-10 s); a consumer loop stalled longer
        # than this has its inbox given back, which at worst delivers a message twice.
        return int(max(10.0, 6 * float(self.unacked_restore_interval)))

    def keep_inboxes(self) -> None:
        """On the restore schedule: refresh our inboxes' keys, and give back the inboxes of
        workers whose key expired (they died with a message between queue and ``unacked``)."""
        ours = {self.inbox(k) for k in self._own_inboxes_checked}
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for inbox in ours:
                pipe.set(f"{inbox}{self.sep}{_ALIVE}", 1, ex=self._inbox_ttl_s())
            pipe.smembers(INBOXES_KEY)
            listed = pipe.execute()[-1]
            others = [bytes_to_str(i) for i in listed if bytes_to_str(i) not in ours]
            if not others:
                return
            alive = client.mget([f"{i}{self.sep}{_ALIVE}" for i in others])
            marker = f"{self.sep}{_INBOX}{self.sep}"
            for inbox, flag in zip(others, alive, strict=True):
                if flag is None and marker in inbox:
                    queue_key = inbox.rsplit(marker, 1)[0]
                    moved = client.eval(_GIVE_BACK, 3, inbox, queue_key, INBOXES_KEY)
                    if moved:
                        log.warning("inbox_given_back", inbox=inbox, messages=int(moved))


class MultiChannelPoller(kombu_redis.MultiChannelPoller):
    _next_restore = 0.0

    def get(self, callback: Any, timeout: Any = None) -> Any:
        if worker_state.should_stop is not None or worker_state.should_terminate is not None:
            # A shutdown was asked for: end this drain now. Celery's loop checks for it only
            # between drains, which it runs with a 2 s timeout (and the pidbox with 1 s), so
            # an idle gevent worker took 4-5 s to act on SIGTERM.
            sleep(0.02)  # callers loop on the timeout: do not spin
            raise TimeoutError  # socket.timeout, which the drain loops expect
        # Without an event loop (gevent, threads) Celery drains events with a 2 s timeout.
        # When every prefetch slot is taken kombu sends no BRPOP, so the poll then sleeps
        # out those 2 s even after jobs finish: a worker of short jobs ran 50 of them, then
        # stalled (measured: 27 jobs/s at -c 50, see bench/). Poll briefly while saturated,
        # so a freed slot asks for the next message within SATURATED_POLL_S.
        if timeout is None or timeout > SATURATED_POLL_S:
            for channel in getattr(self, "_channels", ()):
                if channel.active_queues and not channel.qos.can_consume():
                    timeout = SATURATED_POLL_S
                    break
        return super().get(callback, timeout)

    def on_poll_start(self) -> None:
        # Before kombu sends this poll's fetches: a channel with no fetch in flight has an
        # empty inbox unless something was stranded there (see give_back_stranded).
        self._restore_on_schedule()
        super().on_poll_start()
        for channel in getattr(self, "_channels", ()):
            # Every prefetch slot is taken: kombu sends no BRPOP until a job is acked, and a
            # worker busy with long jobs is healthy, as long as its loop still polls.
            if channel.active_queues and not channel.qos.can_consume():
                STATE.consumed()

    def _restore_on_schedule(self) -> None:
        """Give back messages whose visibility timeout passed (a killed worker's jobs).

        kombu restores them from the event loop's timer (prefork) or when a poll times out
        with no reply at all; without an event loop (gevent, threads, solo) an idle queue's
        BRPOP answers nil every second, which counts as a reply, so the restore never ran.
        """
        now = monotonic()
        if now < self._next_restore:
            return
        channels = [c for c in getattr(self, "_channels", ()) if c.active_queues]
        if not channels:
            return
        self._next_restore = now + float(channels[0].unacked_restore_interval)
        try:
            for channel in channels:
                channel.keep_deliveries()
        except channels[0].connection_errors:
            log.debug("delivery_upkeep_skipped")  # the main loop reconnects; next time then
        self.maybe_restore_messages()
        try:
            channels[0].keep_inboxes()
            for channel in channels:
                channel.give_back_stranded()
        except channels[0].connection_errors:
            log.debug("inbox_upkeep_skipped")


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = MultiChannelPoller()


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """Our channel (inboxes, kept deliveries, unreadable items) on a master found through
    Sentinel: kombu's ``SentinelChannel`` supplies the pool (``master_name`` from the
    transport options), ours everything else. After a failover each new connection asks the
    Sentinels for the master; the consumer's reconnect (Celery's) builds fresh ones."""

    connection_class = SentinelConnection
    # Ours (traffic classes) and kombu's Sentinel options (master_name, sentinel_kwargs...).
    from_transport_options = tuple(
        dict.fromkeys(
            Channel.from_transport_options + kombu_redis.SentinelChannel.from_transport_options
        )
    )


class SentinelTransport(Transport):
    Channel = SentinelChannel
    default_port = kombu_redis.SentinelTransport.default_port


def _not_a_message(exc: BaseException) -> None:
    log.error("queue_item_not_a_message", error=f"{type(exc).__name__}: {exc}"[:300])
    _dead_letter_unreadable(repr(exc)[:300])


def _dead_letter_unreadable(detail: str) -> None:
    try:
        from worker.celery_app import app
        from worker.runtime.context import get_runtime
        from worker.settings import load_settings

        rt = get_runtime(app.settings or load_settings())
        rt.store.dead_letter(job_id="", reason="unreadable_queue_item", payload=detail)
    except Exception:
        log.exception("dead_letter_failed")
