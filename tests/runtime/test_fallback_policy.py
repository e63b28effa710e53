"""worker.runtime.fallback: which failures move a job to its next model, and its chain."""

from __future__ import annotations

import pytest

from worker.catalogue import ModelCatalogue, ModelSpec
from worker.errors import PermanentUpstreamError, TransientUpstreamError, UpstreamError
from worker.runtime.fallback import (
    FallbackState,
    after_failure,
    counts_toward_fallback,
    honours_retry_after,
    plan_chain,
    skip_model,
)
from worker.runtime.retry_policy import error_from_response, error_from_stream_event

CATALOGUE = ModelCatalogue.build(
    {
        "a": ModelSpec(max_tokens=8192),
        "b": ModelSpec(max_tokens=8192, aliases=("bee",)),
        "small": ModelSpec(max_tokens=100),
        "hidden": ModelSpec(max_tokens=8192),
    },
    allowed=["a", "b", "small"],
)


def _transient(
    status: int | None, reason: str = "x", retry_after: float | None = None
) -> TransientUpstreamError:
    return TransientUpstreamError(
        "boom", status_code=status, reason=reason, retry_after_s=retry_after
    )


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
def test_server_errors_count_toward_a_fallback(status: int) -> None:
    """5xx and 529 responses blame the model."""
    assert counts_toward_fallback(error_from_response(status, {}, b""))


def test_a_long_429_counts_and_a_short_one_does_not() -> None:
    """A 429 counts only when its retry-after asks for 5 s or more."""
    assert counts_toward_fallback(error_from_response(429, {"retry-after": "30"}, b""))
    assert not counts_toward_fallback(error_from_response(429, {"retry-after": "1"}, b""))
    assert not counts_toward_fallback(error_from_response(429, {}, b""))


def test_overloaded_mid_stream_counts() -> None:
    """An overloaded_error or api_error event inside a stream blames the model."""
    for kind in ("overloaded_error", "api_error"):
        event = {"type": "error", "error": {"type": kind, "message": "m"}}
        assert counts_toward_fallback(error_from_stream_event(event))
    rate = {"type": "error", "error": {"type": "rate_limit_error", "message": "m"}}
    assert not counts_toward_fallback(error_from_stream_event(rate))


@pytest.mark.parametrize(
    "error",
    [
        _transient(None, "connection_lost"),
        _transient(None, "timeout"),
        _transient(None, "malformed_sse"),
        _transient(408, "http_408"),
        _transient(409, "http_409"),
        PermanentUpstreamError("bad", status_code=400, reason="http_400"),
        PermanentUpstreamError("no", status_code=500, reason="http_500"),  # x-should-retry
    ],
)
def test_other_failures_stay_on_the_model(error: UpstreamError) -> None:
    """Network trouble, timeouts, malformed streams, 408/409 and permanent errors do not count."""
    assert not counts_toward_fallback(error)


def test_chain_keeps_allowed_fallbacks_in_order() -> None:
    """The chain is the job's model then its allowed fallbacks; aliases resolve, repeats go."""
    chain, skipped = plan_chain("a", ["bee", "a", "b"], catalogue=CATALOGUE, max_tokens=50)
    assert chain == ("a", "b")
    assert skipped == ()


def test_chain_skips_a_model_not_allowed_and_one_too_small() -> None:
    """A fallback outside ALLOWED_MODELS, or whose max_tokens bound the request exceeds, is out."""
    chain, skipped = plan_chain("a", ["hidden", "small", "b"], catalogue=CATALOGUE, max_tokens=500)
    assert chain == ("a", "b")
    assert [(s.model, s.reason) for s in skipped] == [
        ("hidden", "not_allowed"),
        ("small", "max_tokens"),
    ]
    assert "500" in skipped[1].detail
    assert "100" in skipped[1].detail


def test_switches_after_the_configured_failures_then_stays_on_the_last() -> None:
    """After N counting failures the next model is tried; the last model is kept."""
    state = FallbackState(("a", "b"))
    overloaded = error_from_response(529, {}, b"")
    state = after_failure(state, overloaded, after_attempts=2)
    assert (state.model, state.failures) == ("a", 1)
    state = after_failure(state, overloaded, after_attempts=2)
    assert (state.model, state.failures) == ("b", 0)
    for _ in range(3):
        state = after_failure(state, overloaded, after_attempts=2)
    assert state.model == "b"


def test_failures_that_do_not_count_leave_the_state_alone() -> None:
    """A network cut neither switches nor adds to the count."""
    state = FallbackState(("a", "b"), failures=1)
    assert after_failure(state, _transient(None, "connection_lost"), after_attempts=2) == state


def test_after_one_attempt_switches_at_once() -> None:
    """FALLBACK_AFTER_ATTEMPTS=1 moves on after the first counting failure."""
    state = after_failure(FallbackState(("a", "b")), _transient(503), after_attempts=1)
    assert state.model == "b"


def test_skip_moves_to_the_next_model_unless_it_is_the_last() -> None:
    """A cooling model is skipped only when a later one exists."""
    skipped = skip_model(FallbackState(("a", "b"), failures=1))
    assert skipped == FallbackState(("a", "b"), 1, 0)
    assert skip_model(FallbackState(("a", "b"), 1)) is None


def test_resume_goes_on_with_the_last_attempts_model() -> None:
    """A redelivered job resumes on the model its last attempt went to, if still in its chain."""
    assert FallbackState.resume(("a", "b"), "b").model == "b"
    assert FallbackState.resume(("a", "b"), "gone").model == "a"
    assert FallbackState.resume(("a", "b"), None).model == "a"


def test_a_long_retry_after_is_not_waited_out_when_another_model_can_answer() -> None:
    """The wait honours retry-after on the same model; not when the next attempt goes to
    another model, nor when a later model exists and the wait asked for is long."""
    long_429 = error_from_response(429, {"retry-after": "30"}, b"")
    short_429 = error_from_response(429, {"retry-after": "1"}, b"")
    chain = FallbackState(("a", "b"))
    last = FallbackState(("a", "b"), 1)
    switched = FallbackState(("a", "b"), 1)
    assert not honours_retry_after(chain, chain, long_429)
    assert honours_retry_after(chain, chain, short_429)
    assert honours_retry_after(last, last, long_429)  # nowhere else to go
    assert not honours_retry_after(chain, switched, short_429)
