"""Which worker runs a job, kept alive while it does, and the signals that stop it early.

A worker that takes a job holds its *lease* (a token and an expiry in the job hash, see
``claim.lua``). One :class:`LeaseKeeper` per worker process renews every lease it holds in a
single script call every third of ``LEASE_TTL_S``. So:

* a job delivered again while a live worker runs it (the broker's visibility timeout passed,
  or a connection was lost) waits for that worker instead of running twice;
* a killed worker's jobs are taken over once its leases lapse and the broker redelivers them.

The keeper also stops running jobs early, through their :class:`JobHandle`:

* ``cancelled``: ``cancel.lua`` publishes the job id on the cancels channel, which every
  keeper listens to; the renew call also reports cancel flags, which covers messages missed
  while the subscriber reconnected;
* ``expired``: the job reached its deadline; a watchdog looks every ``DEADLINE_TICK_S``, so a
  stream that keeps sending ``ping`` events (per-read timeouts never fire) still ends;
* ``lease_lost``: another worker holds the lease now (this process was frozen too long);
* ``shutdown``: the worker is stopping; jobs waiting (backoff, limiter, parked duplicates)
  are handed back at once, streaming jobs when ``SHUTDOWN_GRACE_S`` runs out.

Stopping a handle wakes its sleeps and shuts the socket of its upstream response down, which
wakes a read blocked on a stalled stream under threads and gevent alike.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Literal

import redis
import structlog

from worker.runtime.job_store import WorkerStore
from worker.store import text

log = structlog.get_logger("worker.runtime.leases")

StopReason = Literal["cancelled", "expired", "lease_lost", "shutdown"]

#: How often the keeper looks for running jobs past their deadline.
DEADLINE_TICK_S = 0.25


class JobHandle:
    """One running job's lease token and its stop signal."""

    def __init__(self, job_id: str, token: str, delivery_tag: str | None = None) -> None:
        self.job_id = job_id
        self.token = token
        #: The broker's tag of the message being run: refreshed with the lease, so that the
        #: delivery stays invisible to the visibility sweep while the lease is alive.
        self.delivery_tag = delivery_tag
        #: When the job must end (epoch seconds); the keeper stops it then (``expired``).
        self.deadline_at: float | None = None
        self.stop_reason: StopReason | None = None
        self.draining = False
        #: The job's end is being written: a renewal that finds the lease gone meanwhile sees
        #: the end's doing (``finish.lua`` drops it), not another worker's takeover.
        self.ending = False
        self._wake = threading.Event()
        self._interrupt: Callable[[], None] | None = None
        self._lock = threading.Lock()

    def stop(self, reason: StopReason) -> None:
        """Ask the job to stop; the first reason wins. Safe from any thread or greenlet."""
        with self._lock:
            if self.stop_reason is not None:
                return  # stopped already (pub/sub and the renewal can both report a cancel)
            self.stop_reason = reason
            interrupt = self._interrupt
        self._wake.set()
        if interrupt is not None:
            _quietly(interrupt)

    def notice_drain(self) -> None:
        """The worker is shutting down: wake sleeps, but let a running call go on."""
        self.draining = True
        self._wake.set()

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when woken early by a stop or a drain."""
        if seconds <= 0:
            return self.stop_reason is not None or self.draining
        return self._wake.wait(seconds)

    def set_interrupt(self, interrupt: Callable[[], None] | None) -> None:
        """Register how to abort the current upstream call (None when it is over)."""
        with self._lock:
            self._interrupt = interrupt
            stopped = self.stop_reason is not None
        if stopped and interrupt is not None:
            _quietly(interrupt)


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # an interrupt races the call's own end; nothing to report
        log.debug("interrupt_failed", exc_info=True)


def new_token(hostname: str) -> str:
    return f"{hostname}:{uuid.uuid4().hex[:16]}"


class LeaseKeeper:
    """Renews this process's leases and relays stop signals to its running jobs."""

    def __init__(
        self,
        store: WorkerStore,
        *,
        lease_ttl_s: float,
        touch_deliveries: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.store = store
        self.lease_ttl_s = lease_ttl_s
        self._touch_deliveries = touch_deliveries
        self.draining = False
        self._jobs: dict[str, JobHandle] = {}
        self._lock = threading.Lock()
        self._started = False
        self._closed = threading.Event()
        self._sweep_now = threading.Event()
        self._drained = threading.Event()
        self._grace_ends: float | None = None
        self._drain_noticed = False

    # -- jobs ----------------------------------------------------------------------------

    def register(self, job_id: str, token: str, delivery_tag: str | None = None) -> JobHandle:
        handle = JobHandle(job_id, token, delivery_tag)
        with self._lock:
            self._jobs[job_id] = handle
            if not self._started:
                self._started = True
                self._start_threads()
        if self.draining:
            handle.notice_drain()
        return handle

    def unregister(self, handle: JobHandle) -> None:
        with self._lock:
            if self._jobs.get(handle.job_id) is handle:
                del self._jobs[handle.job_id]

    def handles(self) -> list[JobHandle]:
        with self._lock:
            return list(self._jobs.values())

    # -- shutdown ------------------------------------------------------------------------

    def drain(self, grace_s: float, *, quiet: bool = False) -> None:
        """Warm shutdown: waiting jobs hand back now, running ones after ``grace_s``.

        ``quiet`` skips the log line: from a signal handler, logging could deadlock on a
        lock the interrupted code holds.
        """
        if self.draining:
            return
        # Called from a signal handler (under gevent, in the event loop itself): nothing here
        # may block or take a lock: a lock held by a greenlet would raise there and could be
        # left taken, and a job unregistering later would wait on it forever (a worker that
        # never finished its warm shutdown). Flags and events only; the renew loop tells the
        # jobs and ends the grace.
        self._grace_ends = time.monotonic() + grace_s
        self.draining = True
        self._drained.set()
        if not quiet:
            log.info("worker_draining", grace_s=grace_s)
        self._sweep_now.set()

    def _notice_drain(self) -> None:
        """In the renew loop: tell every job that the worker is draining."""
        handles = self.handles()
        log.info("worker_draining", jobs=len(handles))
        for handle in handles:
            handle.notice_drain()

    def _grace_over(self) -> None:
        handles = self.handles()
        if handles:
            log.warning("shutdown_grace_over", handing_back=len(handles))
        for handle in handles:
            handle.stop("shutdown")

    def sleep(self, seconds: float) -> bool:
        """A wait outside any job's handle that a warm shutdown cuts short."""
        return self._drained.wait(seconds)

    def close(self) -> None:
        self._closed.set()
        self._sweep_now.set()

    # -- background work -----------------------------------------------------------------

    def _start_threads(self) -> None:
        loops = (
            (self._renew_loop, "llmw-leases"),
            (self._listen_loop, "llmw-cancels"),
            (self._deadline_loop, "llmw-deadlines"),
        )
        for target, name in loops:
            threading.Thread(target=target, name=name, daemon=True).start()

    def renew_once(self) -> None:
        handles = self.handles()
        if not handles:
            return
        results = self.store.renew(
            [(h.job_id, h.token) for h in handles], lease_ttl_s=self.lease_ttl_s
        )
        held: list[str] = []
        for handle, result in zip(handles, results, strict=True):
            with self._lock:
                if self._jobs.get(handle.job_id) is not handle:
                    continue  # it ended while we asked: its lease is gone for that reason
            if result == 0:
                if handle.ending:
                    continue  # its end, stored meanwhile, released the lease
                log.warning("lease_lost", job_id=handle.job_id)
                handle.stop("lease_lost")
                continue
            if result == 2:
                handle.stop("cancelled")
            if handle.delivery_tag:
                held.append(handle.delivery_tag)
        if held and self._touch_deliveries is not None:
            self._touch_deliveries(held)

    def _renew_loop(self) -> None:
        interval_s = self.lease_ttl_s / 3
        while not self._closed.is_set():
            wait_s = interval_s
            if self._grace_ends is not None:
                left_s = self._grace_ends - time.monotonic()
                if left_s <= 0:
                    self._grace_ends = None
                    self._grace_over()
                else:
                    wait_s = min(wait_s, left_s)
            self._sweep_now.wait(wait_s)
            self._sweep_now.clear()
            if self.draining and not self._drain_noticed:
                self._drain_noticed = True
                self._notice_drain()
            try:
                self.renew_once()
            except redis.RedisError as exc:
                # Leases last three renew intervals: one failed renewal costs nothing.
                log.warning("lease_renew_failed", error=type(exc).__name__)

    def expire_due(self, now: float | None = None) -> None:
        """Stop every running job whose deadline has passed."""
        now = time.time() if now is None else now
        for handle in self.handles():
            if handle.deadline_at is not None and now >= handle.deadline_at:
                handle.stop("expired")

    def _deadline_loop(self) -> None:
        while not self._closed.wait(DEADLINE_TICK_S):
            self.expire_due()

    def _listen_loop(self) -> None:
        channel = self.store.keys.cancels_channel
        while not self._closed.is_set():
            pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(channel)
                # Messages published while we were not subscribed are lost (pub/sub is at
                # most once): look at the flags themselves now.
                self._sweep_now.set()
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    data = message.get("data")
                    job_id = text(data)
                    with self._lock:
                        handle = self._jobs.get(job_id)
                    if handle is not None:
                        handle.stop("cancelled")
            except redis.RedisError as exc:
                log.warning("cancel_listener_reconnecting", error=type(exc).__name__)
                self._closed.wait(1.0)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()


def wait_time_s(lease_wait_s: float, lease_ttl_s: float) -> float:
    """How long a parked duplicate sleeps before asking for the lease again."""
    return max(0.05, min(lease_wait_s + 0.05, lease_ttl_s / 3))


__all__ = ["JobHandle", "LeaseKeeper", "StopReason", "new_token", "wait_time_s"]
