"""The limiter backend's contract, shared by :class:`RedisBackend` and :class:`MemoryBackend`.

One call decides everything for a limit key, atomically and all-or-nothing:

1. a **cooldown** (set after a 429/529 with ``retry-after``) refuses until it ends;
2. **requests per period** (``rpm``), a sliding-window log (:mod:`.slots`);
3. **input and output tokens per period**, token buckets (:mod:`.bucket`);
4. **calls in flight**, leases that expire unless renewed (:mod:`.slots`).

When any of them refuses, nothing is consumed from the others, and the decision says how
long to wait: the longest of the refusals (all must pass at once, so nothing sooner can
succeed). For a full in-flight limit the wait is only a hint, at most
``Timing.in_flight_poll_s``: a lease ends when its call ends, which nobody can predict.

Limits are "per minute" in :class:`~worker.settings.RateLimit`; the period is
``Timing.period_s`` (60 s), which tests shorten so that real-clock tests stay short.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal, Protocol

from worker.ratelimit import slots
from worker.ratelimit.cost import Cost, Usage
from worker.settings import RateLimit

Reason = Literal["cooldown", "rpm", "input_tpm", "output_tpm", "in_flight"]


@dataclass(frozen=True, slots=True)
class Timing:
    """The time constants of a backend; all workers sharing a Redis must agree on them."""

    #: The period the per-minute limits are counted over.
    period_s: float = 60.0
    #: How long a lease lives without renewal: a killed worker's slot frees after this.
    lease_ttl_s: float = 120.0
    #: The longest retry hint when only the in-flight limit refuses.
    in_flight_poll_s: float = 0.25
    #: Requests are paced: in any window of this length, at most this window's share of
    #: ``rpm`` (:func:`~worker.ratelimit.slots.burst_limit`). 0, or a window as long as the
    #: period, lets a whole period's requests go at once.
    burst_s: float = 0.0

    def __post_init__(self) -> None:
        if min(self.period_s, self.lease_ttl_s, self.in_flight_poll_s) <= 0 or self.burst_s < 0:
            raise ValueError(f"every timing must be positive: {self}")

    def burst_limit(self, rpm: int) -> int:
        """Requests allowed per burst window (0: no pacing)."""
        return slots.burst_limit(rpm, self.burst_s, self.period_s)


@dataclass(frozen=True, slots=True)
class Grant:
    """A granted reservation: what to give back, and the lease to free, on release."""

    reservation_id: str
    limit_key: str
    limit: RateLimit
    cost: Cost

    @property
    def has_lease(self) -> bool:
        """Whether the grant holds an in-flight slot (only when ``max_in_flight`` is set)."""
        return self.limit.max_in_flight is not None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of :meth:`Backend.try_acquire`: a grant, or how long to wait and why."""

    grant: Grant | None
    retry_in_s: float = 0.0
    reason: Reason | None = None

    @property
    def granted(self) -> bool:
        return self.grant is not None


class Backend(Protocol):
    """Shared limiter state. Every method is one atomic step (one round trip for Redis)."""

    @property
    def timing(self) -> Timing:
        """The period and lease constants this backend counts with."""
        ...

    def try_acquire(self, limit_key: str, limit: RateLimit, request_cost: Cost) -> Decision:
        """Take a slot and tokens from every configured limit, or none and say how long to wait."""
        ...

    def release(self, grant: Grant, actual_usage: Usage | None) -> None:
        """Free the lease and settle the tokens (``None``: the reservation stands as spent)."""
        ...

    def renew(self, grant: Grant) -> bool:
        """Push the lease's expiry to ``lease_ttl_s`` from now; False if it expired already."""
        ...

    def set_cooldown(self, limit_key: str, cooldown_s: float) -> float:
        """Refuse the key for ``cooldown_s`` (never shortening a longer one); seconds left."""
        ...


def new_reservation_id() -> str:
    """A random id for a reservation; unique across workers without a round trip."""
    return uuid.uuid4().hex
