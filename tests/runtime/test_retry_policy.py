"""worker.runtime.retry_policy: classification of failures, retry-after, backoff and giving up."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import PermanentUpstreamError, TransientUpstreamError, UpstreamError
from worker.runtime.retry_policy import (
    backoff_delay_s,
    error_from_response,
    error_from_stream_event,
    retry_after_s,
    should_give_up,
)

NOW = 1_764_250_000.0


def _anthropic_body(error_type: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": error_type, "message": message}}).encode()


# --- error_from_response ------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
def test_retryable_statuses_are_transient(status: int) -> None:
    """The retryable statuses give a TransientUpstreamError carrying the status."""
    error = error_from_response(status, {}, b"")
    assert isinstance(error, TransientUpstreamError)
    assert error.retryable
    assert error.status_code == status
    assert error.reason == f"http_{status}"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_request_faults_are_permanent(status: int) -> None:
    """The request's own faults give a PermanentUpstreamError carrying the status."""
    error = error_from_response(status, {}, b"")
    assert isinstance(error, PermanentUpstreamError)
    assert not error.retryable
    assert error.status_code == status
    assert error.reason == f"http_{status}"


def test_unknown_5xx_is_transient_with_a_bounded_reason() -> None:
    """A gateway's odd 5xx is retried and labelled by its class."""
    error = error_from_response(599, {}, b"")
    assert isinstance(error, TransientUpstreamError)
    assert error.reason == "http_5xx"


def test_unknown_4xx_is_permanent_with_a_bounded_reason() -> None:
    """An unlisted 4xx is not retried and is labelled by its class."""
    error = error_from_response(418, {}, b"")
    assert isinstance(error, PermanentUpstreamError)
    assert error.reason == "http_4xx"


def test_type_and_message_come_from_an_anthropic_error_body() -> None:
    """The error type and message are read from {"error": {"type", "message"}}."""
    body = _anthropic_body("rate_limit_error", "slow down please")
    error = error_from_response(429, {}, body)
    assert error.error_type == "rate_limit_error"
    assert error.message == "slow down please"
    assert error.to_error() == {
        "type": "rate_limit_error",
        "message": "slow down please",
        "status_code": 429,
    }


@pytest.mark.parametrize(
    ("status", "body", "message", "error_type"),
    [
        (502, b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>", "api_error"),
        (503, b"", "HTTP 503", "api_error"),
        (400, b"  \n", "HTTP 400", "invalid_request_error"),
        (400, b'{"detail": "nope"}', '{"detail": "nope"}', "invalid_request_error"),
        (500, b"\xff\xfe oops", "\ufffd\ufffd oops", "api_error"),
    ],
)
def test_fallback_message_for_a_body_that_is_not_an_error_object(
    status: int, body: bytes, message: str, error_type: str
) -> None:
    """A non-JSON or foreign body gives its text (or 'HTTP n') and a type by status class."""
    error = error_from_response(status, {}, body)
    assert error.message == message
    assert error.error_type == error_type


def test_fallback_message_is_truncated() -> None:
    """A huge HTML error page does not become a huge error message."""
    error = error_from_response(502, {}, b"x" * 10_000)
    assert len(error.message) <= 200


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_should_retry_true_overrides_a_permanent_status(status: int) -> None:
    """x-should-retry: true makes a normally permanent status transient."""
    error = error_from_response(status, {"x-should-retry": "true"}, b"")
    assert isinstance(error, TransientUpstreamError)


@pytest.mark.parametrize("status", [429, 500, 503, 529])
def test_should_retry_false_overrides_a_transient_status(status: int) -> None:
    """x-should-retry: false makes a normally transient status permanent."""
    error = error_from_response(status, {"X-Should-Retry": "false"}, b"")
    assert isinstance(error, PermanentUpstreamError)


def test_unreadable_should_retry_is_ignored() -> None:
    """An x-should-retry that is neither true nor false leaves the table in charge."""
    assert isinstance(error_from_response(429, {"x-should-retry": "maybe"}, b""), UpstreamError)
    assert error_from_response(429, {"x-should-retry": "maybe"}, b"").retryable
    assert not error_from_response(400, {"x-should-retry": "maybe"}, b"").retryable


def test_response_error_carries_the_retry_after() -> None:
    """The classified error remembers how long the upstream asked us to wait."""
    error = error_from_response(429, {"retry-after": "7"}, b"")
    assert error.retry_after_s == 7.0
    assert error_from_response(429, {}, b"").retry_after_s is None


# --- retry_after_s ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"Retry-After-Ms": "100"}, 0.1),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
        ({"retry-after": "2"}, 2.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after": "0"}, 0.0),
        ({}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after-ms": "garbage"}, None),
    ],
)
def test_retry_after_headers(headers: dict[str, str], expected: float | None) -> None:
    """retry-after-ms wins, then retry-after in seconds; garbage means None."""
    assert retry_after_s(headers, now=NOW) == expected


def test_retry_after_as_an_http_date() -> None:
    """retry-after may be an HTTP date; the wait is measured from `now`."""
    when = datetime.fromtimestamp(NOW + 30, tz=UTC)
    headers = {"retry-after": format_datetime(when, usegmt=True)}
    assert retry_after_s(headers, now=NOW) == pytest.approx(30.0)


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "-5"},
        {"retry-after-ms": "-100"},
        {"retry-after": format_datetime(datetime.fromtimestamp(NOW - 60, tz=UTC), usegmt=True)},
    ],
)
def test_retry_after_is_never_negative(headers: dict[str, str]) -> None:
    """A negative number or a date in the past means 'now', never a negative wait."""
    assert retry_after_s(headers, now=NOW) == 0.0


# --- error_from_stream_event ----------------------------------------------------------------


@pytest.mark.parametrize(
    "error_type", ["overloaded_error", "api_error", "rate_limit_error", "timeout_error"]
)
def test_provider_stream_errors_are_transient(error_type: str) -> None:
    """An error event that is the provider's trouble is retried."""
    event = {"type": "error", "error": {"type": error_type, "message": "Overloaded"}}
    error = error_from_stream_event(event)
    assert isinstance(error, TransientUpstreamError)
    assert error.error_type == error_type
    assert error.message == "Overloaded"
    assert error.reason == "stream_error_event"


@pytest.mark.parametrize("error_type", ["invalid_request_error", "authentication_error"])
def test_request_stream_errors_are_permanent(error_type: str) -> None:
    """An error event that is the request's fault is not retried."""
    event = {"type": "error", "error": {"type": error_type, "message": "bad"}}
    assert isinstance(error_from_stream_event(event), PermanentUpstreamError)


@pytest.mark.parametrize("event", [{"type": "error"}, {"type": "error", "error": "boom"}])
def test_malformed_stream_error_is_a_transient_api_error(event: dict[str, object]) -> None:
    """An error event without a readable error object counts as a transient api_error."""
    error = error_from_stream_event(event)
    assert isinstance(error, TransientUpstreamError)
    assert error.error_type == "api_error"
    assert error.message


# --- backoff_delay_s ------------------------------------------------------------------------


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0)])
def test_backoff_is_jittered_exponential(attempt: int, ceiling: float) -> None:
    """The delay after attempt n lies in [0.5, 1] x base * 2**(n-1)."""
    rng = random.Random(1234)
    for _ in range(50):
        delay = backoff_delay_s(attempt, base_s=0.5, max_s=30, rng=rng)
        assert 0.5 * ceiling <= delay <= ceiling


def test_backoff_is_capped_at_max() -> None:
    """Late attempts never wait longer than max_s."""
    rng = random.Random(7)
    delays = [backoff_delay_s(30, base_s=0.5, max_s=30, rng=rng) for _ in range(50)]
    assert all(15 <= d <= 30 for d in delays)


def test_backoff_is_deterministic_for_a_seeded_rng() -> None:
    """The same seed gives the same delays."""
    a = [backoff_delay_s(3, base_s=1, max_s=30, rng=random.Random(5)) for _ in range(3)]
    b = [backoff_delay_s(3, base_s=1, max_s=30, rng=random.Random(5)) for _ in range(3)]
    assert a == b


def test_backoff_jitter_spreads_workers_apart() -> None:
    """Different draws give different delays, so failed workers do not retry together."""
    rng = random.Random(99)
    assert len({backoff_delay_s(4, base_s=0.5, max_s=30, rng=rng) for _ in range(20)}) > 1


def test_retry_after_longer_than_backoff_wins() -> None:
    """A retry-after above the backoff is honoured, even above max_s."""
    delay = backoff_delay_s(1, base_s=0.5, max_s=2, retry_after=10, rng=random.Random(0))
    assert delay == 10


def test_retry_after_shorter_than_backoff_does_not_shorten_it() -> None:
    """A short retry-after never makes the wait shorter than the backoff."""
    rng = random.Random(0)
    expected = backoff_delay_s(5, base_s=1, max_s=30, rng=random.Random(0))
    assert backoff_delay_s(5, base_s=1, max_s=30, retry_after=0.1, rng=rng) == expected


def test_retry_after_is_capped() -> None:
    """A retry-after beyond retry_after_max_s is cut to retry_after_max_s."""
    delay = backoff_delay_s(
        1, base_s=0.5, max_s=30, retry_after=3600, retry_after_max_s=60, rng=random.Random(0)
    )
    assert delay == 60


@settings(max_examples=200)
@given(
    attempt=st.integers(1, 100),
    base_s=st.floats(0.01, 10),
    extra_s=st.floats(0, 100),
    retry_after=st.none() | st.floats(0, 10_000),
    retry_after_max_s=st.floats(0.1, 600),
    seed=st.integers(0, 2**32),
)
def test_backoff_bounds_property(
    *,
    attempt: int,
    base_s: float,
    extra_s: float,
    retry_after: float | None,
    retry_after_max_s: float,
    seed: int,
) -> None:
    """Delay is within jittered exponential bounds, or exactly the capped retry-after."""
    max_s = base_s + extra_s
    delay = backoff_delay_s(
        attempt,
        base_s=base_s,
        max_s=max_s,
        retry_after=retry_after,
        retry_after_max_s=retry_after_max_s,
        rng=random.Random(seed),
    )
    ceiling = min(max_s, base_s * 2 ** (attempt - 1))
    assert delay >= 0.5 * ceiling - 1e-9
    if retry_after is None:
        assert delay <= ceiling + 1e-9
    else:
        asked = min(retry_after, retry_after_max_s)
        assert delay >= asked
        assert delay <= max(ceiling, asked) + 1e-9
        assert delay <= max(max_s, retry_after_max_s) + 1e-9


# --- should_give_up -----------------------------------------------------------------------

_TRANSIENT = TransientUpstreamError("overloaded", status_code=529)
_PERMANENT = PermanentUpstreamError("bad request", status_code=400)


@pytest.mark.parametrize(
    ("error", "attempt", "max_attempts", "delay_s", "time_left_s", "expected"),
    [
        (_PERMANENT, 1, 5, 0.5, 900, True),
        (_TRANSIENT, 5, 5, 0.5, 900, True),
        (_TRANSIENT, 6, 5, 0.5, 900, True),
        (_TRANSIENT, 1, 5, 30, 10, True),
        (_TRANSIENT, 1, 5, 10, 10, True),
        (_TRANSIENT, 1, 5, 0.5, 900, False),
        (_TRANSIENT, 4, 5, 9.9, 10, False),
    ],
    ids=[
        "permanent",
        "attempts-spent",
        "attempts-overspent",
        "delay-beyond-time-left",
        "delay-equals-time-left",
        "transient-with-room",
        "last-attempt-just-fits",
    ],
)
def test_should_give_up(
    *,
    error: UpstreamError,
    attempt: int,
    max_attempts: int,
    delay_s: float,
    time_left_s: float,
    expected: bool,
) -> None:
    """Give up on permanent errors, spent attempts, or a wait that outlives the job."""
    assert (
        should_give_up(
            error,
            attempt=attempt,
            max_attempts=max_attempts,
            delay_s=delay_s,
            time_left_s=time_left_s,
        )
        is expected
    )
