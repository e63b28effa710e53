"""Is this worker consuming? The state that ``/healthz`` and ``/readyz`` read.

A timer that ticks proves only that the process runs: workers have been seen to stop
consuming after a Redis reconnect while their timers kept ticking (celery #8030, #9054,
#10205). So the proof of life is taken from consumption itself, in the broker transport
(:mod:`worker.transport`):

- a ``BRPOP`` issued for at least one of the worker's queues (kombu issues one about every
  second while idle, and again after every message), or
- a poll of the broker that found the worker saturated: every prefetch slot holds a job, so
  kombu rightly issues no ``BRPOP`` until one finishes.

Cancelling the worker's last queue, a consumer that never re-registers after a reconnect, or
a stuck event loop all stop both, and the worker turns unhealthy after the staleness window.
For brokers other than Redis the consumer step in :mod:`worker.health` falls back to a tick
of the consumer's timer.

This module has no dependencies so that the transport can import it cheaply.
"""

from __future__ import annotations

import threading
import time


class ConsumerState:
    """Written by Celery signals and the transport; read by the health server's threads."""

    def __init__(self) -> None:
        self.ready = False
        self.shutting_down = False
        self.last_consumed = 0.0
        self._lock = threading.Lock()

    def consumed(self) -> None:
        """Record a proof of consumption (a BRPOP sent, or a saturated poll)."""
        now = time.monotonic()
        with self._lock:
            self.last_consumed = now

    def alive(self, stale_after_s: float) -> bool:
        """Started, not shutting down, and consumed within the last ``stale_after_s``."""
        return (
            self.ready
            and not self.shutting_down
            and time.monotonic() - self.last_consumed < stale_after_s
        )


#: The one state of this process (the consumer runs in the main process under every pool).
STATE = ConsumerState()
