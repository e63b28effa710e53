"""The limiter front: wait for a reservation, use it as a context manager, settle it.

::

    with limiter.acquire(model, Cost.for_request(request), max_wait_s=30) as reservation:
        response = call_upstream(request)          # reservation.keepalive() on each chunk
        reservation.settle(response_usage)         # give back what the call did not use
    # leaving the block frees the in-flight lease, even on an exception

Being limited is not an error: :meth:`Limiter.acquire` sleeps (quietly, in steps of at most
``max_step_s``, with a little jitter) until the backend grants, and raises
:class:`RateLimitWaitTooLong` only when the wait would pass ``max_wait_s``; its
``retry_in_s`` is the countdown to requeue the job with. No Redis connection is held while
sleeping. The sleep function is injectable (gevent's patched ``time.sleep``, threads, or a
test's fake clock).

Fairness is roughly first come, first served, with no queue or tickets: each waiter asks
again at the time the backend computed, so an earlier waiter usually asks first. Under
contention a later waiter can get in first, and a large token reservation can wait behind
smaller ones that fit sooner; ``max_wait_s`` bounds the damage.

A key with no limit (and no ``default`` limit) is not limited: :meth:`Limiter.acquire`
returns at once without any backend call, and cooldowns are not recorded for it. Configure
``default`` (even ``{}``, which only honours cooldowns) to share 429 cooldowns across workers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import structlog

from worker.errors import LLMWorkerError
from worker.ratelimit.backend import Backend, Grant
from worker.ratelimit.cost import Cost, Usage, capacity_problem
from worker.settings import RateLimit, Settings

log = structlog.get_logger("worker.ratelimit")


class RateLimitWaitTooLong(LLMWorkerError):
    """The limit key would not grant within ``max_wait_s``: requeue in ``retry_in_s``."""

    def __init__(self, limit_key: str, *, retry_in_s: float, reason: str, waited_s: float) -> None:
        self.limit_key = limit_key
        self.retry_in_s = retry_in_s
        #: Which limit refused last: cooldown, rpm, input_tpm, output_tpm or in_flight.
        self.reason = reason
        self.waited_s = waited_s
        super().__init__(
            f"rate limit {reason} of {limit_key!r}: next chance in {retry_in_s:.3f} s "
            f"(waited {waited_s:.3f} s)"
        )


class RateLimitCapacity(LLMWorkerError):
    """The request is larger than a whole bucket of its limit key: no wait could grant it."""

    def __init__(self, limit_key: str, problem: str) -> None:
        self.limit_key = limit_key
        self.problem = problem
        super().__init__(f"rate limit of {limit_key!r}: {problem}")


class Reservation:
    """A granted reservation. Leaving its ``with`` block frees the lease.

    ``settle(usage)`` gives back unused tokens (or charges the overdraft) and frees the lease
    at once; without it the reserved tokens stay spent. Not for concurrent use.
    """

    def __init__(
        self,
        limit_key: str,
        cost: Cost,
        *,
        waited_s: float = 0.0,
        backend: Backend | None = None,
        grant: Grant | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit_key = limit_key
        self.cost = cost
        #: Seconds spent waiting for the grant.
        self.waited_s = waited_s
        self.grant = grant
        self._backend = backend
        self._clock = clock
        self._renewed_at_s = clock()
        self._released = grant is None

    @property
    def limited(self) -> bool:
        """False when the key has no limit and nothing was reserved."""
        return self.grant is not None

    @property
    def reservation_id(self) -> str | None:
        return self.grant.reservation_id if self.grant else None

    @property
    def released(self) -> bool:
        return self._released

    def settle(self, actual_usage: Usage | Mapping[str, Any] | None) -> None:
        """Release now with the real usage (a :class:`Usage` or an API ``usage`` mapping)."""
        usage = Usage.from_api(actual_usage) if isinstance(actual_usage, Mapping) else actual_usage
        self._release(usage)

    def release(self) -> None:
        """Free the lease; the reserved tokens stay spent. Idempotent."""
        self._release(None)

    def renew(self) -> bool:
        """Extend the lease now; False if it had expired (the slot may be someone else's)."""
        if self._backend is None or self.grant is None or self._released:
            return True
        self._renewed_at_s = self._clock()
        return self._backend.renew(self.grant)

    def keepalive(self) -> bool:
        """Renew once a third of the lease TTL has passed since the last renewal; call often."""
        if self._backend is None or self._released:
            return True
        if self._clock() - self._renewed_at_s < self._backend.timing.lease_ttl_s / 3:
            return True
        return self.renew()

    def _release(self, usage: Usage | None) -> None:
        if self._released or self._backend is None or self.grant is None:
            return
        self._released = True
        self._backend.release(self.grant, usage)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except Exception:  # a lost release must not fail a finished call: the lease expires
            log.warning(
                "rate_limit_release_failed",
                limit_key=self.limit_key,
                reservation_id=self.reservation_id,
                exc_info=True,
            )


class Limiter:
    """Waits for grants from a shared :class:`Backend`, per limit key (a model name)."""

    def __init__(
        self,
        backend: Backend,
        limits: Settings | Mapping[str, RateLimit],
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        max_step_s: float = 1.0,
        jitter_s: float = 0.05,
    ) -> None:
        self.backend = backend
        self._limits = limits
        self._sleep = sleep
        self._clock = clock
        self.max_step_s = max_step_s
        self.jitter_s = jitter_s
        self._random = random.Random()

    def limit_for(self, limit_key: str) -> RateLimit | None:
        """The key's own limit, else the ``default`` one, else None (unlimited)."""
        if isinstance(self._limits, Settings):
            return self._limits.rate_limit_for(limit_key)
        return self._limits.get(limit_key) or self._limits.get("default")

    def acquire(self, limit_key: str, cost: Cost, *, max_wait_s: float) -> Reservation:
        """Wait until every limit of the key grants ``cost``; use the result in a ``with``.

        Raises :class:`RateLimitWaitTooLong` as soon as the backend's next chance lies
        beyond ``max_wait_s`` from the start (``max_wait_s=0``: never wait).
        """
        limit = self.limit_for(limit_key)
        if limit is None:
            return Reservation(limit_key, cost, clock=self._clock)
        problem = capacity_problem(limit, cost)
        if problem is not None:
            # Granted at a full bucket, it would put the key in debt for as long as the
            # excess takes to refill (days for max_tokens 10**9): refuse it instead.
            raise RateLimitCapacity(limit_key, problem)
        start_s = self._clock()
        slept = False
        while True:
            decision = self.backend.try_acquire(limit_key, limit, cost)
            # A grant at the first try waited for nothing, whatever the round trip took.
            waited_s = self._clock() - start_s if slept else 0.0
            if decision.grant is not None:
                if slept:
                    log.debug("rate_limit_granted", limit_key=limit_key, waited_s=waited_s)
                return Reservation(
                    limit_key,
                    cost,
                    waited_s=waited_s,
                    backend=self.backend,
                    grant=decision.grant,
                    clock=self._clock,
                )
            reason = decision.reason or "unknown"
            if waited_s + decision.retry_in_s > max_wait_s:
                log.info(
                    "rate_limit_wait_too_long",
                    limit_key=limit_key,
                    reason=reason,
                    retry_in_s=decision.retry_in_s,
                    waited_s=waited_s,
                )
                raise RateLimitWaitTooLong(
                    limit_key, retry_in_s=decision.retry_in_s, reason=reason, waited_s=waited_s
                )
            step_s = min(decision.retry_in_s, self.max_step_s)
            log.debug("rate_limit_wait", limit_key=limit_key, reason=reason, step_s=step_s)
            # Jitter only ever delays: waking before the computed time would be refused.
            self._sleep(step_s + self._random.uniform(0.0, self.jitter_s))
            slept = True

    def set_cooldown(self, limit_key: str, cooldown_s: float) -> float:
        """Pause a limited key for every worker (after a 429/529); seconds left, 0 if unlimited."""
        if self.limit_for(limit_key) is None:
            return 0.0
        return self.backend.set_cooldown(limit_key, cooldown_s)
