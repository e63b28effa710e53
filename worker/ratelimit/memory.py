"""The in-memory limiter backend: the Redis backend's contract, in one process, for tests.

It runs the same pure arithmetic (:mod:`.slots`, :mod:`.bucket`) as the Lua scripts, under a
lock, against an injectable clock, so the contract tests can step time instead of sleeping.
Several :class:`MemoryBackend` objects sharing one :class:`MemoryState` behave like workers
sharing one Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.ratelimit import bucket, slots
from worker.ratelimit.backend import Decision, Grant, Reason, Timing, new_reservation_id
from worker.ratelimit.cost import Cost, Usage, refund
from worker.settings import RateLimit

Clock = Callable[[], float]


class ManualClock:
    """A clock that moves only when told: ``clock()`` reads it, ``advance`` and ``sleep`` move it.

    Pass ``clock.sleep`` as a :class:`~worker.ratelimit.limiter.Limiter`'s sleep function and
    waiting costs no real time.
    """

    def __init__(self, start_s: float = 1_000.0) -> None:
        self.now_s = start_s
        self.slept_s: list[float] = []

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        self.now_s += seconds

    def sleep(self, seconds: float) -> None:
        """Record the sleep and move time forward by it."""
        self.slept_s.append(seconds)
        self.now_s += seconds


@dataclass
class _KeyState:
    """Everything one limit key holds; the Redis backend keeps the same in five keys."""

    requests: dict[str, float] = field(default_factory=dict)  # reservation id -> expiry
    burst: dict[str, float] = field(default_factory=dict)  # the same, over the burst window
    leases: dict[str, float] = field(default_factory=dict)  # reservation id -> expiry
    input: bucket.BucketState | None = None  # None: full
    output: bucket.BucketState | None = None
    cooldown_until_s: float = 0.0


class MemoryState:
    """The shared store, like one Redis server: share it between backends to share limits."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: dict[str, _KeyState] = {}

    def of(self, limit_key: str) -> _KeyState:
        """The state of one limit key (created empty); call with the lock held."""
        return self.keys.setdefault(limit_key, _KeyState())


class MemoryBackend:
    """:class:`~worker.ratelimit.backend.Backend` in process memory; thread-safe."""

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        timing: Timing | None = None,
        state: MemoryState | None = None,
    ) -> None:
        self.clock = clock
        self._timing = timing or Timing()
        self.state = state or MemoryState()

    @property
    def timing(self) -> Timing:
        return self._timing

    def try_acquire(self, limit_key: str, limit: RateLimit, request_cost: Cost) -> Decision:
        """All limits of the key at once: consume from every one, or from none."""
        period_s = self._timing.period_s
        wait_s, reason = 0.0, None

        def refuse(seconds: float, why: Reason) -> None:
            nonlocal wait_s, reason
            if seconds > wait_s:
                wait_s, reason = seconds, why

        with self.state.lock:
            now_s = self.clock()
            key = self.state.of(limit_key)
            if key.cooldown_until_s > now_s:
                refuse(key.cooldown_until_s - now_s, "cooldown")
            burst = self._timing.burst_limit(limit.rpm or 0)
            if limit.rpm:
                refuse(slots.wait_s(key.requests.values(), limit.rpm, now_s), "rpm")
                if burst:
                    refuse(slots.wait_s(key.burst.values(), burst, now_s), "rpm")
            input_level = output_level = 0.0
            if limit.input_tpm:
                input_level = bucket.level_at(key.input, limit.input_tpm, period_s, now_s)
                refuse(
                    bucket.wait_s(
                        input_level, limit.input_tpm, period_s, request_cost.input_tokens
                    ),
                    "input_tpm",
                )
            if limit.output_tpm:
                output_level = bucket.level_at(key.output, limit.output_tpm, period_s, now_s)
                refuse(
                    bucket.wait_s(
                        output_level, limit.output_tpm, period_s, request_cost.output_tokens
                    ),
                    "output_tpm",
                )
            if limit.max_in_flight:
                lease_wait_s = slots.wait_s(key.leases.values(), limit.max_in_flight, now_s)
                if lease_wait_s > 0:
                    refuse(min(lease_wait_s, self._timing.in_flight_poll_s), "in_flight")
            if reason is not None:
                return Decision(grant=None, retry_in_s=wait_s, reason=reason)

            reservation_id = new_reservation_id()
            self._take(
                key,
                limit,
                request_cost,
                reservation_id=reservation_id,
                now_s=now_s,
                input_level=input_level,
                output_level=output_level,
            )
        return Decision(grant=Grant(reservation_id, limit_key, limit, request_cost))

    def _take(
        self,
        key: _KeyState,
        limit: RateLimit,
        request_cost: Cost,
        *,
        reservation_id: str,
        now_s: float,
        input_level: float,
        output_level: float,
    ) -> None:
        """Consume from every limit of the key (the checks passed); call with the lock held."""
        period_s = self._timing.period_s
        if limit.rpm:
            key.requests = slots.prune(key.requests, now_s)
            key.requests[reservation_id] = now_s + period_s
            if self._timing.burst_limit(limit.rpm):
                key.burst = slots.prune(key.burst, now_s)
                key.burst[reservation_id] = now_s + self._timing.burst_s
        if limit.input_tpm:
            key.input = bucket.take(input_level, request_cost.input_tokens, now_s, limit.input_tpm)
        if limit.output_tpm:
            key.output = bucket.take(
                output_level, request_cost.output_tokens, now_s, limit.output_tpm
            )
        if limit.max_in_flight:
            key.leases = slots.prune(key.leases, now_s)
            key.leases[reservation_id] = now_s + self._timing.lease_ttl_s

    def release(self, grant: Grant, actual_usage: Usage | None) -> None:
        """Free the lease; give back unused tokens, or charge the overdraft."""
        period_s = self._timing.period_s
        input_delta, output_delta = refund(grant.cost, actual_usage)
        limit = grant.limit
        with self.state.lock:
            now_s = self.clock()
            key = self.state.of(grant.limit_key)
            key.leases.pop(grant.reservation_id, None)
            if limit.input_tpm and input_delta:
                level = bucket.level_at(key.input, limit.input_tpm, period_s, now_s)
                key.input = bucket.give_back(level, limit.input_tpm, input_delta, now_s)
            if limit.output_tpm and output_delta:
                level = bucket.level_at(key.output, limit.output_tpm, period_s, now_s)
                key.output = bucket.give_back(level, limit.output_tpm, output_delta, now_s)

    def renew(self, grant: Grant) -> bool:
        """Extend the lease by ``lease_ttl_s`` from now; False (and gone) if it had expired."""
        if not grant.has_lease:
            return True
        with self.state.lock:
            now_s = self.clock()
            leases = self.state.of(grant.limit_key).leases
            expiry_s = leases.get(grant.reservation_id)
            if expiry_s is None or expiry_s <= now_s:
                leases.pop(grant.reservation_id, None)
                return False
            leases[grant.reservation_id] = now_s + self._timing.lease_ttl_s
            return True

    def set_cooldown(self, limit_key: str, cooldown_s: float) -> float:
        """Pause the key for ``cooldown_s``; a longer cooldown in force stays. Seconds left."""
        with self.state.lock:
            now_s = self.clock()
            key = self.state.of(limit_key)
            if cooldown_s > 0:
                key.cooldown_until_s = max(key.cooldown_until_s, now_s + cooldown_s)
            return max(0.0, key.cooldown_until_s - now_s)
