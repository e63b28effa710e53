"""The worker's side of the shared rate limiter: what each upstream attempt asks of it.

One :class:`RateLimitGate` per worker process (built on first use by the runtime) wraps a
:class:`~worker.ratelimit.Limiter` on the shared :class:`~worker.ratelimit.RedisBackend`:

* :meth:`RateLimitGate.reserve` before every upstream attempt: the limit key (the job's
  metadata ``limit_key``, else the model), the cost (estimated input tokens plus
  ``max_tokens``), and a wait of at most ``RATE_LIMIT_MAX_WAIT_S``, observed in
  ``llm_worker_rate_limit_wait_seconds``. A longer wait raises :class:`JobPostponed`: the
  job goes back to the queue with a countdown instead of holding a worker slot;
* while the call runs, a background renewer keeps its in-flight lease alive (streamed or
  not, however long), so only a dead worker's lease runs out;
* :meth:`RateLimitGate.settle` gives back what the call did not use;
  :meth:`RateLimitGate.release` frees the lease on every other exit path;
* :meth:`RateLimitGate.after_error`: a 429 or 529 with ``retry-after`` pauses the limit key
  for every worker, not just for the job that saw it.

Without ``RATE_LIMITS`` the gate is inert: no cost estimate, no Redis call, no thread. Limiter
trouble (Redis errors while settling or renewing) is logged, never allowed to fail a call
that already happened; the lease then expires on its own.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
import structlog

from worker import metrics as m
from worker.accounting.tenancy import split_qualified_id
from worker.errors import LLMWorkerError, UpstreamError
from worker.keys import Keys
from worker.ratelimit.backend import Backend, Timing
from worker.ratelimit.cost import Cost, Usage, limit_key_for, no_output_usage
from worker.ratelimit.limiter import Limiter, RateLimitWaitTooLong, Reservation
from worker.ratelimit.redis_backend import RedisBackend
from worker.settings import RateLimit, Settings

log = structlog.get_logger("worker.ratelimit")

#: Responses whose ``retry-after`` speaks for the whole key, not just one request.
COOLDOWN_STATUSES = frozenset({429, 529})
#: A requeued job comes back no sooner than this (an in-flight refusal only hints 0.25 s)...
MIN_COUNTDOWN_S = 1.0
#: ...and no later than this. (The worker holding a countdown message refreshes its delivery,
#: so a countdown longer than the visibility timeout is not delivered twice.)
MAX_COUNTDOWN_S = 300.0
#: Requeued jobs spread over this fraction of their countdown, so they do not return at once.
COUNTDOWN_JITTER = 0.1
#: The limiter counts a request from its grant, the provider from its arrival a moment later.
#: Holding each request slot this much longer than the period absorbs the difference in that
#: delay between two requests, so a burst granted when the previous one's slots expire never
#: reaches the provider before that previous burst left the provider's window.
SEND_MARGIN_S = 0.25


class JobPostponed(LLMWorkerError):
    """The job must leave this worker and come back to the queue in ``countdown_s``."""

    def __init__(self, countdown_s: float, *, reason: str, detail: str) -> None:
        self.countdown_s = countdown_s
        #: ``rate_limited`` or ``worker_shutdown``: the ``retry`` event's reason.
        self.reason = reason
        self.detail = detail
        super().__init__(detail)

    def to_error(self) -> dict[str, Any]:
        """The ``error`` object of the ``retry`` event that announces the requeue."""
        return {"type": self.reason, "message": self.detail, "status_code": None}


class ModelCoolingDown(LLMWorkerError):
    """The model's limit key is under a cooldown (after a 429/529) for ``retry_in_s``, and the
    caller would rather try another model than wait (``reserve(skip_cooldown=True)``)."""

    def __init__(self, limit_key: str, retry_in_s: float) -> None:
        self.limit_key = limit_key
        self.retry_in_s = retry_in_s
        super().__init__(f"{limit_key!r} is cooling down for {retry_in_s:.3f} s")


class WaitInterrupted(LLMWorkerError):
    """The job's stop signal (cancel, shutdown) woke it while it waited for the limiter."""


def requeue_countdown_s(retry_in_s: float, *, jitter: float = 0.0) -> float:
    """When a job the limiter turned away comes back: at its next chance, spread by
    ``jitter`` (0..1 of :data:`COUNTDOWN_JITTER`), within the bounds above."""
    countdown_s = max(MIN_COUNTDOWN_S, retry_in_s) * (1 + COUNTDOWN_JITTER * jitter)
    return min(MAX_COUNTDOWN_S, countdown_s)


def cooldown_s_for(exc: UpstreamError, *, max_s: float) -> float:
    """How long the whole key pauses after ``exc``: its ``retry-after`` for a 429 or 529,
    capped like retry delays; 0 for anything else."""
    if exc.status_code not in COOLDOWN_STATUSES or not exc.retry_after_s:
        return 0.0
    return min(max(0.0, exc.retry_after_s), max_s)


class LeaseRenewer:
    """Renews the in-flight leases of this process's running calls, every third of the TTL."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._held: set[Reservation] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, reservation: Reservation) -> None:
        """Keep ``reservation``'s lease alive until :meth:`drop`."""
        with self._lock:
            self._held.add(reservation)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="llmw-ratelimit-leases", daemon=True
                )
                self._thread.start()

    def drop(self, reservation: Reservation) -> None:
        with self._lock:
            self._held.discard(reservation)

    def renew_all(self) -> None:
        """One pass: renew every held lease (one round trip each)."""
        with self._lock:
            held = list(self._held)
        for reservation in held:
            try:
                renewed = reservation.renew()
            except Exception:  # Redis trouble: the next pass tries again, well within the TTL
                log.warning("rate_limit_lease_renew_failed", exc_info=True)
                continue
            if not renewed and not reservation.released:
                # This process was frozen past the TTL: the slot may be someone else's now.
                log.warning("rate_limit_lease_lost", limit_key=reservation.limit_key)

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            self.renew_all()


class RateLimitGate:
    """The rate limiter as the runner uses it; one per worker process."""

    def __init__(
        self,
        backend: Backend | None,
        limits: Settings | Mapping[str, RateLimit],
        *,
        max_wait_s: float,
        cooldown_max_s: float,
        metadata_of: Callable[[str], Mapping[str, Any]] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._wall_clock = wall_clock
        #: None (no backend): no limits configured, nothing to do.
        self.limiter = None if backend is None else self._limiter(backend, sleep)
        self.max_wait_s = max_wait_s
        self.cooldown_max_s = cooldown_max_s
        self._metadata_of = metadata_of
        self._random = random.Random()
        self.renewer = LeaseRenewer(backend.timing.lease_ttl_s / 3 if backend else 1.0)

    def _limiter(self, backend: Backend, sleep: Callable[[float], None]) -> Limiter:
        return Limiter(backend, self._limits, sleep=sleep, clock=self._clock)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        client: redis.Redis[Any],
        metadata_of: Callable[[str], Mapping[str, Any]] | None = None,
    ) -> RateLimitGate:
        """The gate for ``RATE_LIMITS`` on the shared Redis; inert when none are set."""
        backend = None
        if settings.rate_limits:
            timing = Timing(
                period_s=settings.rate_limit_period_s + SEND_MARGIN_S,
                lease_ttl_s=settings.rate_limit_lease_ttl_s,
                burst_s=settings.rate_limit_burst_s,
            )
            backend = RedisBackend(client, Keys(settings.key_prefix), timing=timing)
        return cls(
            backend,
            settings,
            max_wait_s=settings.rate_limit_max_wait_s,
            cooldown_max_s=settings.retry_after_max_s,
            metadata_of=metadata_of,
        )

    @property
    def enabled(self) -> bool:
        return self.limiter is not None

    def limit_key(self, job_id: str, model: str) -> str:
        """The job's limit key; reads its metadata only when limits are configured."""
        if self.limiter is None:
            return model
        metadata = self._metadata_of(job_id) if self._metadata_of is not None else None
        tenant = split_qualified_id(job_id)[0]
        limits = self._limits.rate_limits if isinstance(self._limits, Settings) else self._limits
        return limit_key_for(model, metadata, tenant, limits)

    def reserve(
        self,
        job_id: str,
        request: Mapping[str, Any],
        *,
        model: str,
        deadline_at: float | None = None,
        sleep: Callable[[float], bool] | None = None,
        skip_cooldown: bool = False,
    ) -> Reservation:
        """Wait for the limiter; the reservation to settle or release after the call.

        ``sleep`` (a job handle's) returns True when a stop signal woke it: the wait then
        ends with :class:`WaitInterrupted`. Raises :class:`JobPostponed` when the wait would
        pass ``RATE_LIMIT_MAX_WAIT_S`` (or the job's deadline). With ``skip_cooldown`` (the
        job has a fallback model), a key under a cooldown raises :class:`ModelCoolingDown`
        at once instead of waiting.
        """
        limiter = self.limiter
        if limiter is None:
            return Reservation(model, Cost())
        limit_key = self.limit_key(job_id, model)
        if limiter.limit_for(limit_key) is None:
            return Reservation(limit_key, Cost())
        max_wait_s = self.max_wait_s
        if deadline_at is not None:
            max_wait_s = max(0.0, min(max_wait_s, deadline_at - self._wall_clock()))
        waiting = limiter if sleep is None else self._limiter(limiter.backend, _waker(sleep))
        cost = Cost.for_request(request)
        reservation = None
        if skip_cooldown:
            # One try without waiting: a refusal takes nothing, so only a cooldown's costs a
            # second round trip (the wait below) when it is not a cooldown.
            try:
                reservation = waiting.acquire(limit_key, cost, max_wait_s=0.0)
            except RateLimitWaitTooLong as exc:
                if exc.reason == "cooldown":
                    raise ModelCoolingDown(limit_key, exc.retry_in_s) from None
        try:
            if reservation is None:
                reservation = waiting.acquire(limit_key, cost, max_wait_s=max_wait_s)
        except RateLimitWaitTooLong as exc:
            raise self._postponed(exc, model) from exc
        m.RATE_LIMIT_WAIT.labels(model).observe(reservation.waited_s)
        if reservation.grant is not None and reservation.grant.has_lease:
            self.renewer.hold(reservation)
        return reservation

    def _postponed(self, exc: RateLimitWaitTooLong, model: str) -> JobPostponed:
        countdown_s = requeue_countdown_s(
            exc.retry_in_s,
            jitter=self._random.random(),
        )
        m.RATE_LIMIT_REQUEUES.labels(model, exc.reason).inc()
        log.info(
            "rate_limit_requeue",
            limit_key=exc.limit_key,
            reason=exc.reason,
            waited_s=round(exc.waited_s, 3),
            countdown_s=round(countdown_s, 3),
        )
        return JobPostponed(
            countdown_s,
            reason="rate_limited",
            detail=(
                f"rate limit {exc.reason} of {exc.limit_key!r}: back in the queue for "
                f"{countdown_s:.1f} s (waited {exc.waited_s:.1f} s)"
            ),
        )

    def settle(self, reservation: Reservation, message: Mapping[str, Any], *, model: str) -> None:
        """Give back what the call did not use, per the final message's ``usage``."""
        usage = message.get("usage")
        if not isinstance(usage, Mapping) or not reservation.limited:
            self.release(reservation)  # unknown usage: the reservation stands
            return
        self._refund(reservation, Usage.from_api(usage), model)

    def _refund(self, reservation: Reservation, used: Usage, model: str) -> None:
        self.renewer.drop(reservation)
        try:
            reservation.settle(used)
        except Exception:  # a lost refund only makes the limiter stricter
            log.warning("rate_limit_settle_failed", limit_key=reservation.limit_key, exc_info=True)
            return
        cost = reservation.cost
        refunds = {
            "input": cost.input_tokens - used.input_tokens,
            "output": cost.output_tokens - used.output_tokens,
        }
        for kind, tokens in refunds.items():
            if tokens > 0:
                m.RATE_LIMIT_REFUNDED_TOKENS.labels(model, kind).inc(tokens)

    def release(self, reservation: Reservation) -> None:
        """Free the lease (idempotent; nothing to do after :meth:`settle`)."""
        self.renewer.drop(reservation)
        try:
            reservation.release()
        except Exception:  # the lease expires on its own
            log.warning("rate_limit_release_failed", limit_key=reservation.limit_key, exc_info=True)

    def after_error(
        self,
        reservation: Reservation,
        exc: UpstreamError,
        *,
        model: str,
        produced_output: bool = True,
    ) -> None:
        """Settle a failed call as the upstream counted it, and pause the key for every
        worker after a 429 or 529 with ``retry-after``.

        A call that produced no output (an error status, a connection error, a stream cut
        before any chunk) gives its output reservation back, and a 429/529 its input too: a
        rejected request must not keep the key's tokens spent. A call cut after output
        began keeps its whole reservation (what it produced is unknown).
        """
        if self.limiter is None:
            return
        if not produced_output and reservation.limited:
            used = no_output_usage(
                reservation.cost, input_counted=exc.status_code not in COOLDOWN_STATUSES
            )
            self._refund(reservation, used, model)
        cooldown_s = cooldown_s_for(exc, max_s=self.cooldown_max_s)
        if cooldown_s <= 0:
            return
        try:
            left_s = self.limiter.set_cooldown(reservation.limit_key, cooldown_s)
        except Exception:  # the job's own retry still honours retry-after
            log.warning("rate_limit_cooldown_failed", exc_info=True)
            return
        if left_s > 0:
            m.RATE_LIMIT_COOLDOWNS.labels(model).inc()
            log.info(
                "rate_limit_cooldown",
                limit_key=reservation.limit_key,
                status_code=exc.status_code,
                cooldown_s=round(left_s, 3),
            )


def _waker(sleep: Callable[[float], bool]) -> Callable[[float], None]:
    """A limiter's sleep that ends the wait with :class:`WaitInterrupted` when ``sleep``
    reports that a stop signal woke it."""

    def wait(seconds: float) -> None:
        if sleep(seconds):
            raise WaitInterrupted("a stop signal woke the rate limit wait")

    return wait
