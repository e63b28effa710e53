"""worker.ratelimit.gate: the runner's side of the limiter, on the memory backend, fake clock."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from prometheus_client import REGISTRY

from worker.errors import PermanentUpstreamError, TransientUpstreamError
from worker.ratelimit import Cost, ManualClock, MemoryBackend, Timing
from worker.ratelimit.gate import (
    MAX_COUNTDOWN_S,
    MIN_COUNTDOWN_S,
    JobPostponed,
    RateLimitGate,
    WaitInterrupted,
    cooldown_s_for,
    limit_key_for,
    requeue_countdown_s,
)
from worker.ratelimit.limiter import RateLimitCapacity
from worker.settings import RateLimit

MODEL = "deepseek-ai/DeepSeek-V3"
TIMING = Timing(period_s=60.0, lease_ttl_s=30.0, in_flight_poll_s=0.25)
REQUEST: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "x" * 400}],  # about 100 input tokens
}


def _gate(
    limits: Mapping[str, RateLimit],
    *,
    max_wait_s: float = 10.0,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[RateLimitGate, ManualClock, MemoryBackend]:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock, timing=TIMING)
    gate = RateLimitGate(
        backend,
        limits,
        max_wait_s=max_wait_s,
        cooldown_max_s=60.0,
        metadata_of=lambda _job_id: metadata or {},
        sleep=clock.sleep,
        clock=clock,
        wall_clock=clock,
    )
    return gate, clock, backend


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _http_error(status: int, retry_after_s: float | None) -> TransientUpstreamError:
    return TransientUpstreamError(
        "limited", status_code=status, reason=f"http_{status}", retry_after_s=retry_after_s
    )


def test_limit_key_is_the_metadata_limit_key_else_the_model() -> None:
    """metadata limit_key (a non-empty string) wins; anything else falls back to the model."""
    assert limit_key_for(MODEL, {"limit_key": "tenant-a"}) == "tenant-a"
    assert limit_key_for(MODEL, None) == MODEL
    assert limit_key_for(MODEL, {"limit_key": 7}) == MODEL
    assert limit_key_for(MODEL, {"limit_key": " "}) == MODEL
    assert limit_key_for(MODEL, {"limit_key": "x" * 201}) == MODEL


def test_requeue_countdown_is_bounded_and_jittered() -> None:
    """At least MIN_COUNTDOWN_S, up to 10 % jitter, at most MAX_COUNTDOWN_S (the visibility
    timeout no longer bounds it: the holder of a countdown message keeps it invisible)."""
    assert requeue_countdown_s(0.25) == MIN_COUNTDOWN_S
    assert requeue_countdown_s(10.0) == 10.0
    assert requeue_countdown_s(10.0, jitter=1.0) == pytest.approx(11.0)
    assert requeue_countdown_s(500.0) == MAX_COUNTDOWN_S


def test_cooldown_only_for_429_and_529_with_retry_after() -> None:
    """429/529 with retry-after pause the key (capped); other statuses or no header do not."""
    assert cooldown_s_for(_http_error(429, 3.0), max_s=60) == 3.0
    assert cooldown_s_for(_http_error(529, 600.0), max_s=60) == 60.0
    assert cooldown_s_for(_http_error(429, None), max_s=60) == 0.0
    assert cooldown_s_for(_http_error(503, 3.0), max_s=60) == 0.0
    assert cooldown_s_for(PermanentUpstreamError("bad", status_code=400), max_s=60) == 0.0


def test_no_limits_means_no_limiter_work() -> None:
    """Without RATE_LIMITS nothing is estimated, read or stored: the reservation is inert."""

    def no_metadata(_job_id: str) -> Mapping[str, Any]:
        raise AssertionError("metadata read without limits")

    gate = RateLimitGate(
        None,
        {},
        max_wait_s=10,
        cooldown_max_s=60,
        metadata_of=no_metadata,
    )
    reservation = gate.reserve("job", REQUEST, model=MODEL)
    assert not reservation.limited
    gate.after_error(reservation, _http_error(429, 5.0), model=MODEL)
    gate.settle(reservation, {"usage": {"input_tokens": 1}}, model=MODEL)
    assert not gate.enabled


def test_a_key_without_a_limit_is_not_reserved() -> None:
    """A model with no limit and no default passes without touching the backend."""
    gate, _, backend = _gate({"other-model": RateLimit(rpm=1)})
    assert not gate.reserve("job", REQUEST, model=MODEL).limited
    assert backend.state.keys == {}


def test_reserve_waits_for_the_limit_and_observes_the_wait() -> None:
    """The second call of an rpm=1 key waits a period; the wait is observed per model."""
    gate, clock, _ = _gate({MODEL: RateLimit(rpm=1)}, max_wait_s=120)
    before = _sample("llm_worker_rate_limit_wait_seconds_sum", model=MODEL)
    count = _sample("llm_worker_rate_limit_wait_seconds_count", model=MODEL)
    gate.release(gate.reserve("a", REQUEST, model=MODEL))
    reservation = gate.reserve("b", REQUEST, model=MODEL)
    assert reservation.waited_s >= TIMING.period_s
    assert sum(clock.slept_s) >= TIMING.period_s
    assert _sample("llm_worker_rate_limit_wait_seconds_count", model=MODEL) == count + 2
    waited = _sample("llm_worker_rate_limit_wait_seconds_sum", model=MODEL) - before
    assert waited == pytest.approx(reservation.waited_s)


def test_a_wait_past_the_max_postpones_the_job() -> None:
    """Past max_wait_s: JobPostponed with the countdown to the next chance, counted by reason."""
    gate, _, _ = _gate({MODEL: RateLimit(rpm=1)}, max_wait_s=5)
    gate.reserve("a", REQUEST, model=MODEL)
    before = _sample("llm_worker_rate_limit_requeues_total", model=MODEL, reason="rpm")
    with pytest.raises(JobPostponed) as caught:
        gate.reserve("b", REQUEST, model=MODEL)
    assert caught.value.reason == "rate_limited"
    assert TIMING.period_s <= caught.value.countdown_s <= TIMING.period_s * 1.1
    assert caught.value.to_error()["type"] == "rate_limited"
    after = _sample("llm_worker_rate_limit_requeues_total", model=MODEL, reason="rpm")
    assert after == before + 1


def test_the_jobs_deadline_bounds_the_wait() -> None:
    """A job whose deadline comes before its slot is postponed instead of waiting."""
    gate, clock, _ = _gate({MODEL: RateLimit(rpm=1)}, max_wait_s=120)
    gate.reserve("a", REQUEST, model=MODEL)
    with pytest.raises(JobPostponed):
        gate.reserve("b", REQUEST, model=MODEL, deadline_at=clock() + 10)


def test_a_stop_signal_interrupts_the_wait() -> None:
    """A job handle's sleep that reports a wake-up ends the wait with WaitInterrupted."""
    gate, _, _ = _gate({MODEL: RateLimit(rpm=1)}, max_wait_s=120)
    gate.reserve("a", REQUEST, model=MODEL)
    with pytest.raises(WaitInterrupted):
        gate.reserve("b", REQUEST, model=MODEL, sleep=lambda _s: True)


def test_metadata_limit_key_selects_the_limit() -> None:
    """Jobs carrying limit_key share that key's limit, whatever their model."""
    gate, _, backend = _gate({"tenant-a": RateLimit(rpm=1)}, metadata={"limit_key": "tenant-a"})
    reservation = gate.reserve("a", REQUEST, model=MODEL)
    assert reservation.limit_key == "tenant-a"
    assert set(backend.state.keys) == {"tenant-a"}
    with pytest.raises(JobPostponed):
        gate.reserve("b", {**REQUEST, "model": "other"}, model="other")


def test_release_frees_the_in_flight_slot() -> None:
    """max_in_flight=1: the slot is free again as soon as the call's reservation is released."""
    gate, _, _ = _gate({MODEL: RateLimit(max_in_flight=1)}, max_wait_s=0)
    first = gate.reserve("a", REQUEST, model=MODEL)
    with pytest.raises(JobPostponed):
        gate.reserve("b", REQUEST, model=MODEL)
    gate.release(first)
    gate.release(first)  # idempotent
    gate.release(gate.reserve("b", REQUEST, model=MODEL))


def test_settle_gives_back_unused_tokens() -> None:
    """Settling with the real usage returns the unused output tokens to the bucket at once."""
    gate, _, _ = _gate({MODEL: RateLimit(output_tpm=150)}, max_wait_s=0)
    gate.settle(
        gate.reserve("a", REQUEST, model=MODEL), {"usage": {"output_tokens": 10}}, model=MODEL
    )
    # 140 left: another 100-token reservation fits now; without the refund it would wait.
    gate.settle(
        gate.reserve("b", REQUEST, model=MODEL), {"usage": {"output_tokens": 100}}, model=MODEL
    )
    with pytest.raises(JobPostponed):
        gate.reserve("c", REQUEST, model=MODEL)


def test_a_429_with_retry_after_pauses_the_key_for_everyone() -> None:
    """after_error on a 429 sets the cooldown: the next reservation is refused for its length."""
    gate, clock, _ = _gate({MODEL: RateLimit()}, max_wait_s=0)
    before = _sample("llm_worker_rate_limit_cooldowns_total", model=MODEL)
    reservation = gate.reserve("a", REQUEST, model=MODEL)
    gate.after_error(reservation, _http_error(429, 5.0), model=MODEL)
    gate.release(reservation)
    with pytest.raises(JobPostponed) as caught:
        gate.reserve("b", REQUEST, model=MODEL)
    assert "cooldown" in caught.value.detail
    assert _sample("llm_worker_rate_limit_cooldowns_total", model=MODEL) == before + 1
    clock.advance(5.0)
    gate.reserve("b", REQUEST, model=MODEL)


def test_an_error_without_retry_after_sets_no_cooldown() -> None:
    """A 503, or a 429 without retry-after, leaves the key open."""
    gate, _, _ = _gate({MODEL: RateLimit()}, max_wait_s=0)
    reservation = gate.reserve("a", REQUEST, model=MODEL)
    gate.after_error(reservation, _http_error(503, 5.0), model=MODEL)
    gate.after_error(reservation, _http_error(429, None), model=MODEL)
    gate.reserve("b", REQUEST, model=MODEL)


def test_the_renewer_keeps_a_long_calls_lease_alive() -> None:
    """A held lease renewed every third of the TTL outlives the TTL; a dropped one expires."""
    gate, clock, _ = _gate({MODEL: RateLimit(max_in_flight=1)}, max_wait_s=0)
    reservation = gate.reserve("a", REQUEST, model=MODEL)
    for _ in range(4):  # 40 s, past the 30 s TTL
        clock.advance(TIMING.lease_ttl_s / 3)
        gate.renewer.renew_all()
    with pytest.raises(JobPostponed):
        gate.reserve("b", REQUEST, model=MODEL)
    gate.renewer.drop(reservation)  # as if the worker died: nobody renews any more
    clock.advance(TIMING.lease_ttl_s)
    gate.release(gate.reserve("b", REQUEST, model=MODEL))


def test_limiter_trouble_never_fails_a_finished_call() -> None:
    """Redis errors while settling, releasing or setting a cooldown are logged, not raised."""
    gate, _, backend = _gate({MODEL: RateLimit(max_in_flight=1, output_tpm=1000)})
    reservation = gate.reserve("a", REQUEST, model=MODEL)

    def broken(*_args: object) -> None:
        raise ConnectionError("redis went away")

    backend.release = broken  # type: ignore[method-assign]
    backend.set_cooldown = broken  # type: ignore[method-assign]
    gate.after_error(reservation, _http_error(429, 5.0), model=MODEL)
    gate.settle(reservation, {"usage": {"output_tokens": 1}}, model=MODEL)
    gate.release(reservation)


def test_a_request_larger_than_a_bucket_is_refused_and_takes_nothing() -> None:
    """max_tokens beyond the key's output_tpm can never be granted: refused at once (no debt),
    and a bucket's worth of normal requests is then granted at once."""
    gate, _, _ = _gate({MODEL: RateLimit(output_tpm=400)}, max_wait_s=0)
    with pytest.raises(RateLimitCapacity) as refused:
        gate.reserve("huge", {**REQUEST, "max_tokens": 10**9}, model=MODEL)
    assert "max_tokens 1000000000 exceeds the output_tpm limit of 400" in str(refused.value)
    for job in "abcd":  # 4 x 100 = the whole bucket, no wait (max_wait_s=0)
        gate.reserve(job, REQUEST, model=MODEL)
    with pytest.raises(JobPostponed):
        gate.reserve("e", REQUEST, model=MODEL)


@pytest.mark.parametrize(
    ("status", "produced_output", "kept_input", "kept_output"),
    [
        (400, False, True, 0),  # refused before any output: the output reservation returns
        (429, False, False, 0),  # turned away: input and output return
        (529, False, False, 0),
        (503, True, True, 100),  # cut after output began: what it produced is unknown
    ],
)
def test_a_failed_call_gives_back_what_the_upstream_did_not_count(
    status: int, produced_output: bool, kept_input: bool, kept_output: int
) -> None:
    """after_error refunds a call that produced no output (its output; after a 429/529 its
    input too) and counts the refund; a call cut mid-output keeps its reservation."""
    gate, _, backend = _gate({MODEL: RateLimit(input_tpm=1000, output_tpm=1000)}, max_wait_s=0)
    before = _sample("llm_worker_rate_limit_refunded_tokens_total", model=MODEL, kind="output")
    reservation = gate.reserve("a", REQUEST, model=MODEL)
    error = PermanentUpstreamError("x", status_code=status)
    gate.after_error(reservation, error, model=MODEL, produced_output=produced_output)
    gate.release(reservation)
    key = backend.state.of(MODEL)
    reserved_input = Cost.for_request(REQUEST).input_tokens if kept_input else 0
    assert 1000 - key.input.level == pytest.approx(reserved_input, abs=0.01)  # type: ignore[union-attr]
    assert 1000 - key.output.level == pytest.approx(kept_output, abs=0.01)  # type: ignore[union-attr]
    refunded = _sample("llm_worker_rate_limit_refunded_tokens_total", model=MODEL, kind="output")
    assert refunded - before == 100 - kept_output


def test_usage_beyond_the_reservation_puts_at_most_one_bucket_in_debt() -> None:
    """A call that used far more output than reserved charges the overrun, but the debt stops
    at one bucket: the key frees within one period, not after the whole overrun refills."""
    gate, clock, _ = _gate({MODEL: RateLimit(output_tpm=100)}, max_wait_s=120)
    gate.settle(
        gate.reserve("a", REQUEST, model=MODEL), {"usage": {"output_tokens": 10**6}}, model=MODEL
    )
    clock.advance(120.0)  # two periods: -100 refills to +100
    gate.reserve("b", REQUEST, model=MODEL)  # granted without a wait
