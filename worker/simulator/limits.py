"""The simulator's own rate limits: sliding-window arithmetic, no I/O, no clock.

A sliding log rather than a fixed window or GCRA, because it is the one that is exact:
it keeps the admission time (and tokens) of every request admitted in the last
``window_s`` and admits a request only if the requests in ``[now - window_s, now]``,
itself included, stay within ``rpm`` and their tokens within ``tpm``. So no window of
``window_s`` anywhere on the timeline ever holds more than ``rpm`` admissions, which is
what a client-side limiter is measured against. Memory is one entry per admitted request
in the window; checking is amortised O(1) for ``rpm`` (O(entries freed) to compute a
retry-after for ``tpm``).

Rejected requests take no slot, as with the real upstream. The caller passes ``now``
(monotonic seconds), so tests drive time by hand.
"""

from __future__ import annotations

import math
from collections import deque

from worker.simulator.config import RateLimits

# A retry sent at exactly the advertised moment must find the slot free: the window
# keeps entries aged exactly window_s, so advertise a hair later.
_RETRY_MARGIN_S = 0.001


class SlidingWindowLimiter:
    """Admits requests while ``rpm`` and ``tpm`` hold over every ``window_s`` window."""

    __slots__ = ("_limits", "_times", "_tokens", "_used")

    def __init__(self, limits: RateLimits) -> None:
        self._limits = limits
        self._times: deque[float] = deque()
        self._tokens: deque[int] = deque()
        self._used = 0

    def never_fits(self, tokens: int) -> bool:
        """True when one request of ``tokens`` exceeds ``tpm`` on its own."""
        return self._limits.tpm is not None and tokens > self._limits.tpm

    def admit(self, tokens: int, now: float) -> float | None:
        """Record and admit a request (None), or return the seconds until it would fit."""
        limits = self._limits
        times = self._times
        horizon = now - limits.window_s
        while times and times[0] < horizon:
            times.popleft()
            self._used -= self._tokens.popleft()
        wait_s: float | None = None
        if limits.rpm is not None and len(times) >= limits.rpm:
            # The oldest len - rpm + 1 entries must leave; the last of them is this one.
            wait_s = times[len(times) - limits.rpm] - horizon
        if limits.tpm is not None and self._used + tokens > limits.tpm:
            wait_s = max(wait_s or 0.0, self._tpm_wait_s(tokens, horizon))
        if wait_s is not None:
            return wait_s + _RETRY_MARGIN_S
        times.append(now)
        self._tokens.append(tokens)
        self._used += tokens
        return None

    def _tpm_wait_s(self, tokens: int, horizon: float) -> float:
        excess = self._used + tokens - (self._limits.tpm or 0)
        for at, used in zip(self._times, self._tokens, strict=True):
            excess -= used
            if excess <= 0:
                return at - horizon
        return self._limits.window_s  # unreachable when never_fits() was checked first


def retry_after_headers(wait_s: float) -> dict[str, str]:
    """``retry-after`` in whole seconds (ceil, at least 1) and ``retry-after-ms`` (ceil)."""
    return {
        "retry-after": str(max(1, math.ceil(wait_s))),
        "retry-after-ms": str(max(1, math.ceil(wait_s * 1000))),
    }
