"""A rate limiter shared by every worker process through Redis, per limit key (a model).

Layout, pure decisions first and I/O at the edges:

* :mod:`.cost`: what a call costs (estimated before, measured after);
* :mod:`.slots`, :mod:`.bucket`: the arithmetic (sliding request window, in-flight leases,
  token buckets), no I/O;
* :mod:`.backend`: the contract (:class:`Backend`, :class:`Decision`, :class:`Grant`);
* :mod:`.redis_backend`, :mod:`.memory`: the shared implementation and its in-memory twin;
* :mod:`.limiter`: waiting, the ``with`` block, settling.
"""

from __future__ import annotations

from worker.ratelimit.backend import Backend, Decision, Grant, Reason, Timing
from worker.ratelimit.cost import Cost, Usage, estimate_input_tokens
from worker.ratelimit.limiter import Limiter, RateLimitWaitTooLong, Reservation
from worker.ratelimit.memory import ManualClock, MemoryBackend, MemoryState
from worker.ratelimit.redis_backend import RedisBackend

__all__ = [
    "Backend",
    "Cost",
    "Decision",
    "Grant",
    "Limiter",
    "ManualClock",
    "MemoryBackend",
    "MemoryState",
    "RateLimitWaitTooLong",
    "Reason",
    "RedisBackend",
    "Reservation",
    "Timing",
    "Usage",
    "estimate_input_tokens",
]
