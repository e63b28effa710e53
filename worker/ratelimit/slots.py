"""Counting limits as slots held until an expiry time: requests per period, calls in flight.

Both of the limiter's counting limits are the same arithmetic over a set of expiry times:

* **requests per period** (``rpm``): each grant holds a slot from its grant time ``t`` until
  ``t + period_s``. This is a sliding-window log, chosen over GCRA on purpose: GCRA with a
  burst of ``rpm`` admits up to ``2 * rpm - 1`` requests in some window of one period, while
  a sliding log admits at most ``rpm`` in *every* window of one period (the guarantee the
  property tests pin), so it stays under a provider that counts per fixed or sliding minute.
  The cost is memory: one entry per request of the last period.
* **calls in flight** (``max_in_flight``): each grant holds a lease until ``now + lease_ttl_s``;
  releasing deletes it, renewing pushes its expiry, and a killed worker's lease simply expires.

A slot is held while ``now_s < expiry``. The Lua script ``lua/acquire.lua`` does exactly this;
keep the two in step. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def held(expiries: Iterable[float], now_s: float) -> list[float]:
    """The expiry times still held at ``now_s``, soonest first."""
    return sorted(expiry for expiry in expiries if expiry > now_s)


def wait_s(expiries: Iterable[float], limit: int, now_s: float) -> float:
    """Seconds until one more slot is free: 0 when one is free now.

    When more than ``limit`` slots are held (the limit was lowered), enough of them must
    expire to get back under it, so the answer is the expiry of the ``excess``-th soonest.
    """
    live = held(expiries, now_s)
    excess = len(live) - limit
    if excess < 0:
        return 0.0
    return live[excess] - now_s


def prune(slots: Mapping[str, float], now_s: float) -> dict[str, float]:
    """Only the slots (by reservation id) still held at ``now_s``."""
    return {slot_id: expiry for slot_id, expiry in slots.items() if expiry > now_s}


def granted_within(grant_times_s: Iterable[float], start_s: float, length_s: float) -> int:
    """How many grants fall in the half-open window ``[start_s, start_s + length_s)``.

    A checking aid for tests and dashboards: with a sliding log it never exceeds the limit.
    """
    end_s = start_s + length_s
    return sum(1 for t in grant_times_s if start_s <= t < end_s)
