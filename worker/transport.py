"""kombu's Redis transport, hardened against bytes on the queue that are not a message, and
reporting each poll of the worker's queues to :mod:`worker.liveness`.

kombu pops a list item and parses it inside the consumer's event loop; an item that is not a
broker envelope (not JSON, or JSON of the wrong shape) raises out of the loop and Celery stops
the worker as "unrecoverable". The item is already popped, so we record it as a dead letter
and carry on consuming.
"""

from __future__ import annotations

from time import monotonic, sleep
from typing import Any

import structlog
from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis

from worker.liveness import STATE

log = structlog.get_logger("worker.transport")

#: How long a poll waits while every prefetch slot is taken (see ``MultiChannelPoller.get``).
SATURATED_POLL_S = 0.005


class Channel(kombu_redis.Channel):
    def _brpop_start(self, timeout: Any = None) -> None:
        super()._brpop_start(timeout)  # type: ignore[misc]
        if getattr(self, "_in_poll", None):  # a BRPOP went out for at least one queue
            STATE.consumed()

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("queue_item_not_a_message", error=f"{type(exc).__name__}: {exc}"[:300])
            _dead_letter_unreadable(repr(exc)[:300])
            return True


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
        super().on_poll_start()
        self._restore_on_schedule()
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
        self.maybe_restore_messages()


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = MultiChannelPoller()


def _dead_letter_unreadable(detail: str) -> None:
    try:
        from worker.celery_app import app
        from worker.runtime import get_runtime
        from worker.settings import load_settings

        rt = get_runtime(app.settings or load_settings())
        rt.store.dead_letter(job_id="", reason="unreadable_queue_item", payload=detail)
    except Exception:
        log.exception("dead_letter_failed")
