"""What the ``backend`` fixture hands a test: backends sharing state, and a way to move time.

The memory side steps a fake clock. The Redis side cannot fake the server's ``TIME``, so
limits count over a one-second period (:data:`TEST_TIMING`) and time moves by sleeping
exactly the ``retry_in_s`` the backend computed, never a guessed amount.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from worker.keys import Keys
from worker.ratelimit import Cost, Decision, ManualClock, MemoryBackend, MemoryState, Timing
from worker.ratelimit.backend import Backend
from worker.ratelimit.redis_backend import RedisBackend
from worker.settings import RateLimit

#: Short enough for real-clock tests: "per minute" limits count per second here.
TEST_TIMING = Timing(period_s=1.0, lease_ttl_s=0.3, in_flight_poll_s=0.1)


@dataclass
class Harness:
    """One backend kind: ``new()`` makes a "worker" sharing state, ``advance`` moves time."""

    kind: str
    new: Callable[..., Backend]
    advance: Callable[[float], None]
    clock: Callable[[], float]
    #: How far a computed wait may drift from the ideal (real time passes between calls).
    tolerance_s: float
    clients: list[redis.Redis[Any]] = field(default_factory=list)

    def until_granted(
        self, backend: Backend, key: str, limit: RateLimit, cost: Cost, budget_s: float = 1.1
    ) -> tuple[Decision, float]:
        """Retry at the computed times until granted; the decision and the time it took."""
        start_s = self.clock()
        while True:
            decision = backend.try_acquire(key, limit, cost)
            spent_s = self.clock() - start_s
            if decision.granted:
                return decision, spent_s
            assert spent_s + decision.retry_in_s <= budget_s, f"no grant within {budget_s} s"
            self.advance(decision.retry_in_s)


def memory_harness() -> Harness:
    """Memory backends on one shared state and one fake clock."""
    clock = ManualClock()
    state = MemoryState()

    def new(timing: Timing = TEST_TIMING) -> Backend:
        return MemoryBackend(clock=clock, timing=timing, state=state)

    return Harness("memory", new, clock.advance, clock, tolerance_s=1e-9)


def redis_harness(url: str) -> tuple[Harness, Keys]:
    """Redis backends, each on its own client, under a fresh key prefix."""
    keys = Keys(prefix=f"test-rl-{uuid.uuid4().hex[:8]}")
    clients: list[redis.Redis[Any]] = []

    def new(timing: Timing = TEST_TIMING) -> Backend:
        client = redis.Redis.from_url(url)
        clients.append(client)
        return RedisBackend(client, keys, timing=timing)

    def advance(seconds: float) -> None:
        # The server computed the wait from its own clock; a millisecond covers rounding.
        time.sleep(seconds + 0.001)

    harness = Harness("redis", new, advance, time.monotonic, tolerance_s=0.1, clients=clients)
    return harness, keys
