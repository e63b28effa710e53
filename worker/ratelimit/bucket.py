"""Token buckets for input and output tokens per period, with reservations and refunds.

A bucket holds up to ``capacity`` tokens (the per-period amount) and refills continuously at
``capacity / period_s`` tokens per second. A missing bucket is a full one, which lets the
Redis keys expire once a bucket has refilled.

* **Reserve** ``amount`` tokens: granted when the bucket holds them; otherwise the caller
  waits for the refill. The limiter refuses a reservation larger than the whole capacity
  before it reaches a bucket (it could never fit); should one arrive, it is granted once the
  bucket is full and takes the bucket at most one capacity below zero.
* **Give back** the difference once the real usage is known: unused tokens return (never
  above capacity), and usage beyond the reservation is charged, into debt of at most one
  capacity, so that later callers wait for the refill to pay it off (one period at most:
  no single request can lock a key for longer).

The Lua scripts ``lua/acquire.lua`` and ``lua/release.lua`` do exactly this; keep them in
step. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Tolerance for float rounding: a caller who waited exactly the computed time is served.
EPSILON_TOKENS = 1e-6


@dataclass(frozen=True, slots=True)
class BucketState:
    """The level at ``updated_s`` (negative means debt); the refill since is implied."""

    level: float
    updated_s: float


def level_at(state: BucketState | None, capacity: float, period_s: float, now_s: float) -> float:
    """Tokens available at ``now_s``: the stored level plus the refill since, capped."""
    if state is None:
        return float(capacity)
    # A clock that steps back (a failover to another host) must not drain the bucket.
    elapsed_s = max(0.0, now_s - state.updated_s)
    return min(float(capacity), state.level + elapsed_s * capacity / period_s)


def wait_s(level: float, capacity: float, period_s: float, amount: float) -> float:
    """Seconds until ``amount`` tokens can be reserved from a bucket at ``level``: 0 if now."""
    need = min(amount, capacity)
    if level + EPSILON_TOKENS >= need:
        return 0.0
    return (need - level) * period_s / capacity


def bounded(level: float, capacity: float) -> float:
    """A level within one capacity of debt and never above full."""
    return max(-float(capacity), min(float(capacity), level))


def take(level: float, amount: float, now_s: float, capacity: float | None = None) -> BucketState:
    """The bucket after reserving ``amount`` tokens at ``now_s`` (debt bounded by
    ``capacity`` when given)."""
    after = level - amount
    return BucketState(
        level=after if capacity is None else bounded(after, capacity), updated_s=now_s
    )


def give_back(level: float, capacity: float, amount: float, now_s: float) -> BucketState:
    """The bucket after returning ``amount`` tokens (negative: charging them) at ``now_s``."""
    return BucketState(level=bounded(level + amount, capacity), updated_s=now_s)


def full_in_s(state: BucketState, capacity: float, period_s: float) -> float:
    """Seconds from ``state.updated_s`` until the bucket is full again (when it may vanish)."""
    return max(0.0, (capacity - state.level) * period_s / capacity)
