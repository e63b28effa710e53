"""Request counters and a bounded request log, served at ``GET /stats``.

Tests and benchmarks read them to check what reached the upstream (how many requests,
which statuses, how many at once, when the first byte left). Everything runs on the
server's event loop, so plain attributes suffice: no locks.

The JSON shape of :meth:`Stats.snapshot`::

    {"requests": int, "by_status": {"200": int, ...}, "in_flight": int,
     "max_in_flight": int, "first_request_ts": float | null, "last_request_ts": float | null,
     "faults": {"429": int, "cut": int, ...}, "rate_limited": int,
     "accepted_per_s": {"<unix second>": int, ...},
     "requests_log": [{"ts", "status", "model", "stream", "path", "first_byte_ts",
                       "end_ts", "fault", "rate_limited", "usage"}, ...]}

Times are Unix seconds (``time.time()``). ``status`` is null and ``end_ts`` null while a
request is in flight; a streamed request ends when its last byte is written or its
client goes away. ``status`` 0 means no response at all (the ``reset`` fault).

``usage`` is the ``{"input_tokens", "output_tokens"}`` the answer reports, or null for a
request that got no whole answer (an error status or a mid-stream fault).

``faults`` counts injected faults by kind (only kinds that occurred); ``rate_limited``
counts 429s from the simulator's own limits, which are not faults. ``accepted_per_s``
counts, per whole Unix second, the requests the rate limiter admitted (every valid
request when there are no limits), injected faults included: a benchmark sums 60
consecutive seconds to find the busiest window.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any


class RequestRecord:
    """One request's entry in the log; filled in as the request progresses."""

    __slots__ = (
        "end_ts",
        "fault",
        "first_byte_ts",
        "model",
        "path",
        "rate_limited",
        "status",
        "stream",
        "ts",
        "usage",
    )

    def __init__(self, path: str, ts: float) -> None:
        self.ts = ts
        self.path = path
        self.status: int | None = None
        self.model: str | None = None
        self.stream = False
        self.first_byte_ts: float | None = None
        self.end_ts: float | None = None
        self.fault: str | None = None
        self.rate_limited = False
        #: The usage the answer reports (input and output tokens); None for a request that
        #: got no full answer (an error status, a mid-stream fault).
        self.usage: dict[str, int] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "status": self.status,
            "model": self.model,
            "stream": self.stream,
            "path": self.path,
            "first_byte_ts": self.first_byte_ts,
            "end_ts": self.end_ts,
            "fault": self.fault,
            "rate_limited": self.rate_limited,
            "usage": self.usage,
        }


class Stats:
    """Counters since start or the last :meth:`reset`."""

    def __init__(self, log_size: int = 100_000) -> None:
        self._log: deque[RequestRecord] = deque(maxlen=log_size)
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Forget counts and the log; requests still in flight stay counted as such."""
        self.requests = 0
        self.by_status: dict[int, int] = {}
        self.max_in_flight = self.in_flight
        self.first_request_ts: float | None = None
        self.last_request_ts: float | None = None
        self.faults: dict[str, int] = {}
        self.rate_limited = 0
        self.accepted_per_s: dict[int, int] = {}
        self._log.clear()

    def begin(self, path: str) -> RequestRecord:
        """Count a request that has just arrived."""
        now = time.time()
        record = RequestRecord(path, now)
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.first_request_ts is None:
            self.first_request_ts = now
        self.last_request_ts = now
        self._log.append(record)
        return record

    def accept(self, now: float) -> None:
        """Count a request admitted by the rate limiter, in its Unix second."""
        second = int(now)
        self.accepted_per_s[second] = self.accepted_per_s.get(second, 0) + 1

    def fault(self, record: RequestRecord, kind: str) -> None:
        """Count a fault injected into the request of ``record``."""
        record.fault = kind
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def limited(self, record: RequestRecord) -> None:
        """Count a request refused by the rate limiter."""
        record.rate_limited = True
        self.rate_limited += 1

    def end(self, record: RequestRecord, status: int) -> None:
        """Count a request whose response is complete (or abandoned by its client)."""
        now = time.time()
        record.status = status
        record.end_ts = now
        if record.first_byte_ts is None:
            record.first_byte_ts = now
        self.in_flight -= 1
        self.by_status[status] = self.by_status.get(status, 0) + 1

    def snapshot(self, *, with_log: bool = True) -> dict[str, Any]:
        """The counters as JSON-ready data; ``with_log=False`` skips the (large) log."""
        return {
            "requests": self.requests,
            "by_status": {str(code): n for code, n in sorted(self.by_status.items())},
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "first_request_ts": self.first_request_ts,
            "last_request_ts": self.last_request_ts,
            "faults": dict(sorted(self.faults.items())),
            "rate_limited": self.rate_limited,
            "accepted_per_s": {str(s): n for s, n in sorted(self.accepted_per_s.items())},
            "requests_log": [r.as_json() for r in self._log] if with_log else [],
        }
