"""Where retries are decided (pure): which failures are transient, and how long to wait.

Three small functions in the manner of the anthropic SDK: :func:`error_from_response` and
:func:`error_from_stream_event` classify (the result's type says transient or permanent),
:func:`backoff_delay_s` says how long, :func:`should_give_up` says whether to stop.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping
from typing import Any

import orjson

from worker.errors import PermanentUpstreamError, TransientUpstreamError, UpstreamError

#: Statuses worth another attempt. Other 5xx are too (a gateway in front of the model may
#: invent any); every other 4xx is the request's fault and would fail the same way again.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
#: ``error`` events inside a 200 stream that are the provider's trouble, not the request's.
RETRYABLE_STREAM_ERRORS = frozenset(
    {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}
)


def status_reason(status_code: int) -> str:
    """A bounded label: the code for the ones we know, else its class."""
    if status_code in RETRYABLE_STATUSES or status_code in {400, 401, 403, 404, 413, 422}:
        return f"http_{status_code}"
    return f"http_{status_code // 100}xx"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """What the upstream asked us to wait: ``retry-after-ms``, else ``retry-after`` (seconds or
    an HTTP date). ``None`` when absent or unreadable; never negative."""
    raw_ms = _header(headers, "retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _should_retry_override(headers: Mapping[str, str]) -> bool | None:
    value = _header(headers, "x-should-retry")
    if value == "true":
        return True
    if value == "false":
        return False
    return None


def _error_body(body: bytes) -> tuple[str | None, str | None]:
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        error = data["error"]
        return (
            str(error["type"]) if "type" in error else None,
            str(error["message"]) if "message" in error else None,
        )
    return None, None


def error_from_response(status_code: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
    """Classify a non-2xx response. ``x-should-retry`` overrides the status table."""
    error_type, message = _error_body(body)
    override = _should_retry_override(headers)
    retryable = (
        override
        if override is not None
        else status_code in RETRYABLE_STATUSES or (status_code >= 500 and status_code != 501)
    )
    cls = TransientUpstreamError if retryable else PermanentUpstreamError
    text = message or body[:200].decode("utf-8", "replace").strip() or f"HTTP {status_code}"
    return cls(
        text,
        error_type=error_type or ("api_error" if status_code >= 500 else "invalid_request_error"),
        status_code=status_code,
        reason=status_reason(status_code),
        retry_after_s=retry_after_s(headers),
    )


def error_from_stream_event(event: Mapping[str, Any]) -> UpstreamError:
    """Classify an ``error`` event that arrived inside a streamed 200 response."""
    error = event.get("error") if isinstance(event.get("error"), dict) else {}
    assert isinstance(error, dict)
    error_type = str(error.get("type", "api_error"))
    cls = (
        TransientUpstreamError if error_type in RETRYABLE_STREAM_ERRORS else PermanentUpstreamError
    )
    return cls(
        str(error.get("message", "error event in stream")),
        error_type=error_type,
        reason="stream_error_event",
    )


def backoff_delay_s(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    retry_after: float | None = None,
    retry_after_max_s: float = 60.0,
    rng: random.Random | None = None,
) -> float:
    """Delay before attempt ``attempt + 1``, after attempt ``attempt`` (1-based) failed.

    Exponential with jitter (between half and all of ``base * 2**(attempt-1)``, capped), so
    that workers that failed together do not retry together. A ``retry-after`` from the
    upstream wins when it asks for longer, up to ``retry_after_max_s``.
    """
    draw = (rng or random.Random()).random()
    exponential = min(max_s, base_s * (2 ** max(0, attempt - 1)))
    delay: float = exponential * (0.5 + 0.5 * draw)
    if retry_after is not None:
        delay = max(delay, min(retry_after, retry_after_max_s))
    return delay


def should_give_up(
    error: UpstreamError, *, attempt: int, max_attempts: int, delay_s: float, time_left_s: float
) -> bool:
    """Stop when the error is permanent, the attempts are spent, or the wait outlives the job."""
    return not error.retryable or attempt >= max_attempts or delay_s >= time_left_s
