"""worker.ratelimit.slots and .bucket: the limiter's arithmetic, with plain values."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.ratelimit import bucket, slots

gaps_s = st.lists(st.floats(min_value=0.0, max_value=30.0, allow_nan=False), max_size=200)


def _run_window(limit: int, period_s: float, gaps: list[float]) -> list[float]:
    """Attempt a request after each gap; the times of the granted ones."""
    now_s, expiries, granted = 0.0, list[float](), list[float]()
    for gap_s in gaps:
        now_s += gap_s
        if slots.wait_s(expiries, limit, now_s) == 0:
            granted.append(now_s)
            expiries = [*slots.held(expiries, now_s), now_s + period_s]
    return granted


@given(
    limit=st.integers(min_value=1, max_value=20),
    period_s=st.floats(min_value=0.5, max_value=120.0),
    gaps=gaps_s,
)
def test_no_window_of_one_period_holds_more_than_the_limit(
    limit: int, period_s: float, gaps: list[float]
) -> None:
    """However requests arrive, no window of one period contains more than rpm grants."""
    granted = _run_window(limit, period_s, gaps)
    for start_s in granted:
        assert slots.granted_within(granted, start_s, period_s) <= limit
    # Equivalently: the grant ``limit`` places later comes no earlier than the earlier one's
    # slot ends (compared as the limiter computes the end: ``later - earlier`` can round a
    # hair below the period when the grant falls exactly on it).
    for earlier_s, later_s in zip(granted, granted[limit:], strict=False):
        assert later_s >= earlier_s + period_s


@given(
    limit=st.integers(min_value=1, max_value=20),
    period_s=st.floats(min_value=0.5, max_value=120.0),
    gaps=gaps_s,
)
def test_refused_request_is_granted_exactly_at_the_computed_time(
    limit: int, period_s: float, gaps: list[float]
) -> None:
    """wait_s is exact up to float rounding: refused just before it, free at it."""
    granted = _run_window(limit, period_s, gaps)
    now_s = granted[-1] if granted else 0.0
    expiries = [t + period_s for t in granted]
    wait_s = slots.wait_s(expiries, limit, now_s)
    if wait_s > 0:
        # ``now + (expiry - now)`` may round a hair below ``expiry``: at most a nanosecond more.
        assert slots.wait_s(expiries, limit, now_s + wait_s) <= 1e-9
        assert slots.wait_s(expiries, limit, now_s + wait_s * 0.999) > 0


def test_burst_up_to_the_limit_then_wait_for_the_oldest() -> None:
    """A full window frees when its oldest slot ends; a lowered limit waits for the excess."""
    expiries = [10.0, 11.0, 12.0]
    assert slots.wait_s(expiries, 4, 5.0) == 0
    assert slots.wait_s(expiries, 3, 5.0) == 5.0
    assert slots.wait_s(expiries, 2, 5.0) == 6.0
    assert slots.wait_s(expiries, 3, 10.0) == 0
    assert slots.prune({"a": 10.0, "b": 11.0}, 10.0) == {"b": 11.0}


@given(
    capacity=st.integers(min_value=1, max_value=10_000),
    period_s=st.floats(min_value=0.5, max_value=120.0),
    steps=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=60.0), st.integers(0, 12_000)), max_size=100
    ),
)
def test_bucket_never_grants_more_than_capacity_plus_refill(
    capacity: int, period_s: float, steps: list[tuple[float, int]]
) -> None:
    """Tokens granted by any time never exceed the capacity plus the refill since the start."""
    now_s, state, taken = 0.0, None, 0.0
    for gap_s, amount in steps:
        now_s += gap_s
        level = bucket.level_at(state, capacity, period_s, now_s)
        if bucket.wait_s(level, capacity, period_s, min(amount, capacity)) == 0:
            state = bucket.take(level, min(amount, capacity), now_s)
            taken += min(amount, capacity)
        limit = capacity + now_s * capacity / period_s
        assert taken <= limit + bucket.EPSILON_TOKENS * (len(steps) + 1)


def test_bucket_reserve_refund_and_debt() -> None:
    """Reserve, refund capped at capacity, overdraft into debt, and the wait to pay it off."""
    state = bucket.take(bucket.level_at(None, 100, 60.0, 0.0), 100, 0.0)
    assert state.level == 0
    assert bucket.wait_s(state.level, 100, 60.0, 30) == 18.0
    refunded = bucket.give_back(state.level, 100, 500, 0.0)
    assert refunded.level == 100
    debt = bucket.give_back(state.level, 100, -50, 0.0)
    assert debt.level == -50
    assert bucket.wait_s(debt.level, 100, 60.0, 10) == 36.0
    assert bucket.full_in_s(debt, 100, 60.0) == 90.0
    # A reservation beyond the capacity only waits for a full bucket.
    assert bucket.wait_s(0.0, 100, 60.0, 250) == 60.0
    # A clock stepping back does not drain the bucket.
    assert bucket.level_at(bucket.BucketState(50.0, 10.0), 100, 60.0, 5.0) == 50.0
