"""The backend contract, run against the memory and the Redis backend alike."""

from __future__ import annotations

import threading

import pytest

from tests.ratelimit.harness import TEST_TIMING, Harness
from worker.ratelimit import Cost, Timing, Usage
from worker.settings import RateLimit

FREE = Cost()
PERIOD_S = TEST_TIMING.period_s


def test_burst_up_to_rpm_is_granted_then_refused(backend: Harness, key: str) -> None:
    """A burst of ``rpm`` is granted at once; the next one waits until the first slot ends."""
    b = backend.new()
    limit = RateLimit(rpm=3)
    start_s = backend.clock()
    assert all(b.try_acquire(key, limit, FREE).granted for _ in range(3))
    refused = b.try_acquire(key, limit, FREE)
    elapsed_s = backend.clock() - start_s
    assert not refused.granted
    assert refused.grant is None
    assert refused.reason == "rpm"
    assert 0 < refused.retry_in_s <= PERIOD_S
    assert refused.retry_in_s == pytest.approx(PERIOD_S - elapsed_s, abs=backend.tolerance_s)


def test_rpm_refills_at_the_computed_time(backend: Harness, key: str) -> None:
    """Half the computed wait is still refused; the whole of it is granted."""
    b = backend.new()
    limit = RateLimit(rpm=2)
    assert b.try_acquire(key, limit, FREE).granted
    assert b.try_acquire(key, limit, FREE).granted
    refused = b.try_acquire(key, limit, FREE)
    backend.advance(refused.retry_in_s / 2)
    assert not b.try_acquire(key, limit, FREE).granted
    decision, _ = backend.until_granted(b, key, limit, FREE)
    assert decision.granted


def test_token_reservation_waits_for_the_refill(backend: Harness, key: str) -> None:
    """A reservation beyond the tokens left waits for exactly the missing refill."""
    b = backend.new()
    limit = RateLimit(input_tpm=100)
    assert b.try_acquire(key, limit, Cost(input_tokens=60)).granted
    refused = b.try_acquire(key, limit, Cost(input_tokens=60))
    assert refused.reason == "input_tpm"
    assert refused.retry_in_s == pytest.approx(0.2 * PERIOD_S, abs=backend.tolerance_s)
    decision, spent_s = backend.until_granted(b, key, limit, Cost(input_tokens=60))
    assert decision.granted
    assert spent_s == pytest.approx(0.2 * PERIOD_S, abs=backend.tolerance_s * 2)


def test_settling_gives_back_unused_tokens(backend: Harness, key: str) -> None:
    """Releasing with the real usage returns the unused part of the reservation."""
    b = backend.new()
    limit = RateLimit(input_tpm=100, output_tpm=100)
    first = b.try_acquire(key, limit, Cost(input_tokens=90, output_tokens=80)).grant
    assert first is not None
    b.release(first, Usage(input_tokens=30, output_tokens=20))
    again = b.try_acquire(key, limit, Cost(input_tokens=60, output_tokens=80))
    assert again.granted


def test_release_without_usage_gives_nothing_back(backend: Harness, key: str) -> None:
    """Without the real usage the reservation stands as spent."""
    b = backend.new()
    limit = RateLimit(output_tpm=100)
    first = b.try_acquire(key, limit, Cost(output_tokens=80)).grant
    assert first is not None
    b.release(first, None)
    refused = b.try_acquire(key, limit, Cost(output_tokens=80))
    assert refused.reason == "output_tpm"


def test_usage_beyond_the_reservation_puts_the_bucket_in_debt(backend: Harness, key: str) -> None:
    """Overdrawn tokens are charged below zero, and later callers wait to pay them off."""
    b = backend.new()
    limit = RateLimit(output_tpm=100)
    grant = b.try_acquire(key, limit, Cost(output_tokens=100)).grant
    assert grant is not None
    b.release(grant, Usage(output_tokens=150))
    refused = b.try_acquire(key, limit, Cost(output_tokens=10))
    assert refused.reason == "output_tpm"
    assert refused.retry_in_s == pytest.approx(0.6 * PERIOD_S, abs=backend.tolerance_s)


def test_oversized_reservation_waits_for_a_full_bucket(backend: Harness, key: str) -> None:
    """A reservation beyond the capacity (the limiter refuses one; a backend still copes) is
    granted once the bucket is full, into debt of at most one capacity: 1 token then waits
    1.01 periods, not the 1.51 that the whole 250 would have cost."""
    b = backend.new()
    limit = RateLimit(input_tpm=100)
    assert b.try_acquire(key, limit, Cost(input_tokens=30)).granted
    refused = b.try_acquire(key, limit, Cost(input_tokens=250))
    assert refused.retry_in_s == pytest.approx(0.3 * PERIOD_S, abs=backend.tolerance_s)
    decision, _ = backend.until_granted(b, key, limit, Cost(input_tokens=250))
    assert decision.granted
    after = b.try_acquire(key, limit, Cost(input_tokens=1))
    assert after.retry_in_s == pytest.approx(1.01 * PERIOD_S, abs=backend.tolerance_s)


def test_in_flight_limit_refuses_with_a_short_hint(backend: Harness, key: str) -> None:
    """A full in-flight limit refuses with at most the poll hint; a release frees the slot."""
    b = backend.new()
    limit = RateLimit(max_in_flight=1)
    grant = b.try_acquire(key, limit, FREE).grant
    assert grant is not None
    refused = b.try_acquire(key, limit, FREE)
    assert refused.reason == "in_flight"
    assert 0 < refused.retry_in_s <= TEST_TIMING.in_flight_poll_s
    b.release(grant, None)
    assert b.try_acquire(key, limit, FREE).granted


def test_expired_lease_frees_its_slot(backend: Harness, key: str) -> None:
    """A lease never released (its worker died) frees its slot after the lease TTL."""
    dead_worker, live_worker = backend.new(), backend.new()
    limit = RateLimit(max_in_flight=1)
    assert dead_worker.try_acquire(key, limit, FREE).granted
    decision, spent_s = backend.until_granted(live_worker, key, limit, FREE)
    assert decision.granted
    assert spent_s == pytest.approx(TEST_TIMING.lease_ttl_s, abs=backend.tolerance_s * 2)


def test_renewal_keeps_the_lease(backend: Harness, key: str) -> None:
    """A renewed lease outlives its first TTL; once expired it cannot be renewed."""
    timing = Timing(period_s=PERIOD_S, lease_ttl_s=0.5, in_flight_poll_s=0.1)
    b = backend.new(timing)
    limit = RateLimit(max_in_flight=1)
    grant = b.try_acquire(key, limit, FREE).grant
    assert grant is not None
    backend.advance(0.3)
    assert b.renew(grant)
    backend.advance(0.3)  # past the first expiry, well before the renewed one
    assert b.try_acquire(key, limit, FREE).reason == "in_flight"
    backend.advance(timing.lease_ttl_s)
    assert not b.renew(grant)
    assert b.try_acquire(key, limit, FREE).granted


def test_refusal_consumes_nothing(backend: Harness, key: str) -> None:
    """All or nothing: a request refused by one limit takes nothing from the others."""
    b = backend.new()
    limit = RateLimit(rpm=2, input_tpm=100, max_in_flight=5)
    assert b.try_acquire(key, limit, Cost(input_tokens=10)).granted
    assert b.try_acquire(key, limit, Cost(input_tokens=10)).granted
    assert b.try_acquire(key, limit, Cost(input_tokens=10)).reason == "rpm"
    # Neither the tokens nor a lease of the refused request were taken.
    tokens_only = RateLimit(input_tpm=100, max_in_flight=3)
    assert b.try_acquire(key, tokens_only, Cost(input_tokens=80)).granted
    # And a token refusal took no request slot.
    assert b.try_acquire(key, RateLimit(rpm=3, input_tpm=100), Cost(input_tokens=50)).reason == (
        "input_tpm"
    )
    assert b.try_acquire(key, RateLimit(rpm=3), FREE).granted


def test_longest_refusal_is_reported(backend: Harness, key: str) -> None:
    """When several limits refuse, the wait is the longest of them."""
    b = backend.new()
    limit = RateLimit(rpm=1, output_tpm=100)
    assert b.try_acquire(key, limit, Cost(output_tokens=100)).granted
    b.set_cooldown(key, 0.5)
    refused = b.try_acquire(key, limit, Cost(output_tokens=50))
    assert refused.reason == "rpm"
    assert refused.retry_in_s == pytest.approx(PERIOD_S, abs=backend.tolerance_s)


def test_cooldown_from_one_worker_pauses_another(backend: Harness, key: str) -> None:
    """A cooldown set after a 429 by one worker refuses every worker until it ends."""
    first, second = backend.new(), backend.new()
    limit = RateLimit(rpm=100)
    assert first.set_cooldown(key, 0.4) == pytest.approx(0.4, abs=backend.tolerance_s)
    refused = second.try_acquire(key, limit, FREE)
    assert refused.reason == "cooldown"
    assert refused.retry_in_s == pytest.approx(0.4, abs=backend.tolerance_s)
    assert second.try_acquire("other-model", limit, FREE).granted
    decision, spent_s = backend.until_granted(second, key, limit, FREE)
    assert decision.granted
    assert spent_s == pytest.approx(0.4, abs=backend.tolerance_s * 2)


def test_shorter_cooldown_does_not_shorten_a_longer_one(backend: Harness, key: str) -> None:
    """A later, shorter cooldown leaves the longer one in force."""
    first, second = backend.new(), backend.new()
    first.set_cooldown(key, 0.5)
    assert second.set_cooldown(key, 0.1) == pytest.approx(0.5, abs=backend.tolerance_s)
    refused = second.try_acquire(key, RateLimit(), FREE)
    assert refused.reason == "cooldown"
    assert refused.retry_in_s == pytest.approx(0.5, abs=backend.tolerance_s)


def test_limits_are_per_key(backend: Harness) -> None:
    """One limit key being full does not refuse another."""
    b = backend.new()
    limit = RateLimit(rpm=1)
    assert b.try_acquire("model-a", limit, FREE).granted
    assert not b.try_acquire("model-a", limit, FREE).granted
    assert b.try_acquire("model-b", limit, FREE).granted


def test_concurrent_workers_never_exceed_the_limit(backend: Harness, key: str) -> None:
    """Eight workers racing for ten slots get exactly ten, however they interleave."""
    workers = [backend.new(Timing(period_s=60.0)) for _ in range(8)]
    limit = RateLimit(rpm=10)
    granted: list[bool] = []
    lock = threading.Lock()

    def race(worker_index: int) -> None:
        for _ in range(5):
            result = workers[worker_index].try_acquire(key, limit, FREE).granted
            with lock:
                granted.append(result)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(granted) == 40
    assert sum(granted) == 10


def test_requests_are_paced_over_the_burst_window(backend: Harness, key: str) -> None:
    """With a burst window, a backlog goes at the limit's pace: rpm 20 over a 1 s period with
    a 0.25 s window grants 5 at once, then refuses the 6th until the window slides, and the
    whole period still grants all 20 (no share of the limit is lost)."""
    paced = Timing(period_s=1.0, lease_ttl_s=0.3, in_flight_poll_s=0.1, burst_s=0.25)
    b = backend.new(paced)
    limit = RateLimit(rpm=20)
    assert paced.burst_limit(20) == 5
    start_s = backend.clock()
    for _ in range(5):
        assert b.try_acquire(key, limit, FREE).granted
    refused = b.try_acquire(key, limit, FREE)
    assert refused.reason == "rpm"
    assert 0 < refused.retry_in_s <= 0.25 + backend.tolerance_s
    granted = 5
    while granted < 20:
        decision, _ = backend.until_granted(b, key, limit, FREE)
        assert decision.granted
        granted += 1
    if backend.kind == "memory":  # exact on the fake clock (real time may run slow)
        # All 20 within one period of the first grant: paced, at the full rate.
        assert backend.clock() - start_s == pytest.approx(0.75)
        assert b.try_acquire(key, limit, FREE).reason == "rpm"
