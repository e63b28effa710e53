"""The outbox sweeper: publishes again the messages that no producer got confirmed.

With a broker other than the results Redis (AMQP, or a second Redis), a producer creates the
job and keeps its message in the queue's outbox in one step, then publishes it and takes it
out once the broker confirmed it (:mod:`worker.client.outbox`). A producer that died in
between, or a broker that was down, leaves it there. Every worker runs this loop; each tick,
the one worker that takes the tick's lock publishes every message older than
``OUTBOX_GRACE_S`` again, and drops the entries of jobs that started or ended meanwhile. A
copy published twice is delivered twice and run once: the second delivery meets the job's
lease or its end.

With the broker on the results Redis the outbox holds only the gateway's fast-path jobs
(:mod:`worker.gateway.fast_path`): a message whose job is running under a live lease stays;
once that lease lapses (the gateway died), the message is published and a worker takes over.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog
from celery import signals

from worker import metrics as m
from worker.broker import band_of
from worker.client.outbox import Outbox, Publisher, error_summary, make_publisher
from worker.keys import Keys
from worker.settings import Settings

log = structlog.get_logger("worker.runtime.sweeper")


def sweep_interval_s(grace_s: float) -> float:
    """How often a worker tries to sweep: a fifth of the grace, between 0.2 and 1 s."""
    return max(0.2, min(1.0, grace_s / 5))


class OutboxSweeper:
    """Sweeps the outboxes of some queues, one tick at a time (:meth:`sweep_once`)."""

    def __init__(
        self,
        settings: Settings,
        client: Any,
        publisher: Publisher,
        queues: list[str],
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        keys = Keys(settings.key_prefix)
        self.outboxes = [Outbox(client, keys, queue) for queue in queues]
        self.interval_s = sweep_interval_s(settings.outbox_grace_s)
        self._stop = threading.Event()

    def sweep_once(self) -> int:
        """One tick: the number of messages published again."""
        republished = 0
        for outbox in self.outboxes:
            due = outbox.due(grace_s=self.settings.outbox_grace_s, lock_ttl_s=self.interval_s)
            if not due:
                continue
            items, stale = outbox.pending(due)
            outbox.mark_sent(stale)  # started or ended: a worker had its message
            confirmed, error = self.publisher.publish(items)
            outbox.mark_sent(confirmed)
            if confirmed:
                m.OUTBOX_REPUBLISHED.labels(outbox.queue).inc(len(confirmed))
                log.info("outbox_republished", queue=outbox.queue, jobs=len(confirmed))
            if error is not None:
                log.warning(
                    "outbox_republish_failed",
                    queue=outbox.queue,
                    jobs=len(items) - len(confirmed),
                    error=error_summary(error, self.settings.effective_broker_url),
                )
            republished += len(confirmed)
        return republished

    def run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    self.sweep_once()
                except Exception as exc:  # Redis away: the next tick tries again
                    log.warning("outbox_sweep_failed", error=f"{type(exc).__name__}: {exc}"[:200])
        finally:
            self.publisher.close()

    def start(self) -> None:
        threading.Thread(target=self.run, name="llmw-outbox", daemon=True).start()

    def stop(self) -> None:
        """Ask the loop to end (it closes its publisher): a flag only, safe in a signal
        handler."""
        self._stop.set()


_sweepers: list[OutboxSweeper] = []


def consumed_queues(consumer: Any, settings: Settings) -> list[str]:
    """The base queues a worker consumes (priority bands fold into theirs)."""
    try:
        names = list(consumer.app.amqp.queues.consume_from)
    except AttributeError:
        names = []
    bases = {band_of(name) or name for name in names}
    return sorted(bases) or [settings.queue]


@signals.worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    from worker.celery_app import app
    from worker.runtime.context import redis_client
    from worker.settings import load_settings

    settings = app.settings or load_settings()
    # With the broker on the results Redis, only the gateway's fast path keeps messages in
    # the outbox (its jobs, should the gateway die mid-call); a tick costs one script call.
    sweeper = OutboxSweeper(
        settings,
        redis_client(settings, max_connections=4),
        make_publisher(settings),
        consumed_queues(sender, settings),
    )
    _sweepers.append(sweeper)
    sweeper.start()


@signals.worker_shutting_down.connect
def _stop_sweeper(**_: Any) -> None:
    while _sweepers:
        _sweepers.pop().stop()
