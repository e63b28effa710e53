"""worker.ratelimit.limiter: waiting for a grant, the with-block, settling, giving up."""

from __future__ import annotations

from typing import Any

import pytest

from tests.ratelimit.harness import TEST_TIMING, Harness, memory_harness
from worker.errors import LLMWorkerError
from worker.ratelimit import (
    Cost,
    Decision,
    Grant,
    Limiter,
    ManualClock,
    MemoryBackend,
    RateLimitWaitTooLong,
    Timing,
    Usage,
)
from worker.settings import RateLimit, Settings

FREE = Cost()


class RecordingSleep:
    """A sleep function that records each step and moves the harness's time."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.steps_s: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.steps_s.append(seconds)
        self.harness.advance(seconds)


class ExplodingBackend:
    """A backend that fails the test if anything calls it."""

    timing = TEST_TIMING

    def try_acquire(self, limit_key: str, limit: RateLimit, request_cost: Cost) -> Decision:
        raise AssertionError("the backend was called")

    def release(self, grant: Grant, actual_usage: Usage | None) -> None:
        raise AssertionError("the backend was called")

    def renew(self, grant: Grant) -> bool:
        raise AssertionError("the backend was called")

    def set_cooldown(self, limit_key: str, cooldown_s: float) -> float:
        raise AssertionError("the backend was called")


def make_limiter(harness: Harness, limits: dict[str, RateLimit], **options: Any) -> Limiter:
    """A limiter on a fresh backend of the harness, sleeping through the harness's time."""
    return Limiter(
        harness.new(), limits, sleep=RecordingSleep(harness), clock=harness.clock, **options
    )


def test_acquire_waits_then_grants(backend: Harness, key: str) -> None:
    """A refused acquire sleeps until the computed time, then grants and reports the wait."""
    limiter = make_limiter(backend, {key: RateLimit(rpm=1)}, jitter_s=0.0)
    with limiter.acquire(key, FREE, max_wait_s=2.0) as first:
        assert first.waited_s == 0
        assert first.limited
    with limiter.acquire(key, FREE, max_wait_s=2.0) as second:
        assert second.waited_s == pytest.approx(TEST_TIMING.period_s, abs=backend.tolerance_s * 2)


def test_acquire_gives_up_when_the_wait_is_too_long(backend: Harness, key: str) -> None:
    """When the next chance lies beyond max_wait_s it raises at once, with the countdown."""
    limiter = make_limiter(backend, {key: RateLimit(rpm=1)})
    limiter.acquire(key, FREE, max_wait_s=0).release()
    with pytest.raises(RateLimitWaitTooLong) as caught:
        limiter.acquire(key, FREE, max_wait_s=0.5)
    assert isinstance(caught.value, LLMWorkerError)
    assert caught.value.reason == "rpm"
    assert caught.value.limit_key == key
    assert caught.value.retry_in_s == pytest.approx(TEST_TIMING.period_s, abs=backend.tolerance_s)
    assert isinstance(limiter._sleep, RecordingSleep)
    assert limiter._sleep.steps_s == []


def test_exception_inside_the_block_frees_the_lease(backend: Harness, key: str) -> None:
    """Leaving the with-block by an exception releases the in-flight slot."""
    limiter = make_limiter(backend, {key: RateLimit(max_in_flight=1)})
    with pytest.raises(RuntimeError), limiter.acquire(key, FREE, max_wait_s=0):
        raise RuntimeError("upstream blew up")
    with limiter.acquire(key, FREE, max_wait_s=0) as again:
        assert again.limited


def test_settle_gives_back_unused_tokens(backend: Harness, key: str) -> None:
    """settle() with the API's usage mapping refunds what the call did not use."""
    limiter = make_limiter(backend, {key: RateLimit(output_tpm=100)})
    with limiter.acquire(key, Cost(output_tokens=100), max_wait_s=0) as reservation:
        reservation.settle({"input_tokens": 5, "output_tokens": 10})
        assert reservation.released
    with limiter.acquire(key, Cost(output_tokens=90), max_wait_s=0) as again:
        assert again.limited


def test_exit_without_settle_keeps_the_tokens_spent(backend: Harness, key: str) -> None:
    """Without settle() the whole reservation stays spent."""
    limiter = make_limiter(backend, {key: RateLimit(output_tpm=100)})
    with limiter.acquire(key, Cost(output_tokens=100), max_wait_s=0):
        pass
    with pytest.raises(RateLimitWaitTooLong) as caught:
        limiter.acquire(key, Cost(output_tokens=90), max_wait_s=0)
    assert caught.value.reason == "output_tpm"


def test_cooldown_makes_acquire_wait(backend: Harness, key: str) -> None:
    """A cooldown on a key whose limit is only ``default: {}`` still pauses it."""
    limiter = make_limiter(backend, {"default": RateLimit()}, jitter_s=0.0)
    assert limiter.set_cooldown(key, 0.3) == pytest.approx(0.3, abs=backend.tolerance_s)
    with limiter.acquire(key, FREE, max_wait_s=1.0) as reservation:
        assert reservation.waited_s == pytest.approx(0.3, abs=backend.tolerance_s * 2)


@pytest.mark.parametrize("limits", [{}, Settings(rate_limits={"other": RateLimit(rpm=1)})])
def test_unlimited_key_never_calls_the_backend(limits: Any, key: str) -> None:
    """A key without its own or a default limit is granted with no backend call at all."""
    limiter = Limiter(ExplodingBackend(), limits)
    with limiter.acquire(key, Cost(input_tokens=10**9), max_wait_s=0) as reservation:
        assert not reservation.limited
        assert reservation.reservation_id is None
        assert reservation.renew()
        assert reservation.keepalive()
        reservation.settle(Usage(input_tokens=1))
    assert limiter.set_cooldown(key, 10) == 0.0


def test_default_limit_applies_to_unlisted_keys() -> None:
    """A ``default`` limit covers keys without their own."""
    harness = memory_harness()
    limiter = make_limiter(harness, {"default": RateLimit(rpm=1)})
    limiter.acquire("any-model", FREE, max_wait_s=0).release()
    with pytest.raises(RateLimitWaitTooLong):
        limiter.acquire("any-model", FREE, max_wait_s=0)


def test_sleep_steps_are_capped_and_jitter_only_delays(key: str) -> None:
    """A long wait is slept in steps of at most max_step_s plus jitter, never early."""
    harness = memory_harness()
    limiter = make_limiter(harness, {key: RateLimit()}, max_step_s=1.0, jitter_s=0.05)
    limiter.set_cooldown(key, 3.5)
    with limiter.acquire(key, FREE, max_wait_s=10) as reservation:
        assert reservation.waited_s >= 3.5
    assert isinstance(limiter._sleep, RecordingSleep)
    steps_s = limiter._sleep.steps_s
    assert len(steps_s) >= 4
    assert all(step_s <= 1.05 for step_s in steps_s)
    assert sum(steps_s) >= 3.5


def test_keepalive_renews_only_when_due(key: str) -> None:
    """keepalive() renews after a third of the lease TTL, and the renewed lease survives."""
    clock = ManualClock()
    backend = MemoryBackend(clock=clock, timing=Timing(period_s=60, lease_ttl_s=3.0))
    limiter = Limiter(backend, {key: RateLimit(max_in_flight=1)}, sleep=clock.sleep, clock=clock)
    renewals: list[bool] = []
    original_renew = backend.renew

    def counting_renew(grant: Grant) -> bool:
        renewals.append(True)
        return original_renew(grant)

    backend.renew = counting_renew  # type: ignore[method-assign]
    with limiter.acquire(key, FREE, max_wait_s=0) as reservation:
        clock.advance(0.5)
        assert reservation.keepalive()
        assert renewals == []
        for _ in range(5):
            clock.advance(1.1)
            assert reservation.keepalive()
        assert len(renewals) == 5
        with pytest.raises(RateLimitWaitTooLong):
            limiter.acquire(key, FREE, max_wait_s=0)


def test_a_failed_release_does_not_fail_the_block(key: str) -> None:
    """If the release cannot reach the backend the block still exits cleanly (the lease expires)."""
    harness = memory_harness()
    limiter = make_limiter(harness, {key: RateLimit(max_in_flight=1)})

    def broken_release(grant: Grant, actual_usage: Usage | None) -> None:
        raise ConnectionError("redis is down")

    limiter.backend.release = broken_release  # type: ignore[method-assign]
    with limiter.acquire(key, FREE, max_wait_s=0) as reservation:
        pass
    assert reservation.released
