"""Counting limits as slots held until an expiry time: requests per period, calls in flight.

Both of the limiter's counting limits are the same arithmetic over a set of expiry times:

* **requests per period** (``rpm``): each grant holds a slot from its grant time ``t`` until
  ``t + period_s``. This is a sliding-window log, chosen over GCRA on purpose: GCRA with a
  burst of ``rpm`` admits up to ``2 * rpm - 1`` requests in some window of one period, while
  a sliding log admits at most ``rpm`` in *every* window of one period (the guarantee the
  property tests pin), so it stays under a provider that counts per fixed or sliding minute.
  The cost is memory: one entry per request of the last period.
* **pacing** (``rpm`` again, over a short window): each grant also holds a slot for
  ``burst_s``, and at most :func:`burst_limit` of them may be held: the window's share of
  ``rpm``. So a backlog is sent at the limit's pace (120 rpm with a 5 s window: 10 every 5 s)
  instead of a whole minute's requests in the first half second, which providers that also
  enforce over shorter intervals answer with 429s; over a period it still reaches 100 %.
* **calls in flight** (``max_in_flight``): each grant holds a lease until ``now + lease_ttl_s``;
  releasing deletes it, renewing pushes its expiry, and a killed worker's lease simply expires.

A slot is held while ``now_s < expiry``. The Lua script ``lua/acquire.lua`` does exactly this;
keep the two in step. No I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def burst_limit(rpm: int, burst_s: float, period_s: float) -> int:
    """Requests allowed in any ``burst_s`` window: its share of ``rpm``, at least one; 0 means
    no pacing (no window, or one as long as the period, where ``rpm`` itself bounds)."""
    if burst_s <= 0 or burst_s >= period_s or rpm <= 0:
        return 0
    return max(1, math.ceil(rpm * burst_s / period_s - 1e-9))


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
