"""Is this worker consuming? The state that ``/healthz`` and ``/readyz`` read.

A timer that ticks proves only that the process runs: workers have been seen to stop
consuming after a Redis reconnect while their timers kept ticking (celery #8030, #9054,
#10205). So the proof of life is taken from consumption itself, in the broker transport
(:mod:`worker.runtime.transport`):

- a ``BRPOP`` issued for at least one of the worker's queues (kombu issues one about every
  second while idle, and again after every message), or
- a poll of the broker that found the worker saturated: every prefetch slot holds a job, so
  kombu rightly issues no ``BRPOP`` until one finishes.

Cancelling the worker's last queue, a consumer that never re-registers after a reconnect, or
a stuck event loop all stop both, and the worker turns unhealthy after the staleness window.
For brokers other than Redis the consumer step in :mod:`worker.process.server` falls back to a tick
of the consumer's timer.

With ``llm-worker run --processes N`` each worker process mirrors its state into one slot
of a :class:`LivenessBoard`, a small shared file that the supervising process reads to
answer ``/healthz`` for all of them.

This module has no dependencies so that the transport can import it cheaply.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from pathlib import Path

_SLOT = struct.Struct("d")


class LivenessBoard:
    """One float per worker process in a shared file: the monotonic time it last consumed
    (``CLOCK_MONOTONIC`` is system-wide), 0 before it is ready, -1 once it shuts down."""

    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        self.slots = slots
        with path.open("r+b") as f:
            self._map = mmap.mmap(f.fileno(), _SLOT.size * slots)

    @classmethod
    def create(cls, path: Path, slots: int) -> LivenessBoard:
        path.write_bytes(b"\0" * _SLOT.size * slots)
        return cls(path, slots)

    def write(self, slot: int, value: float) -> None:
        _SLOT.pack_into(self._map, _SLOT.size * slot, value)

    def read(self, slot: int) -> float:
        return float(_SLOT.unpack_from(self._map, _SLOT.size * slot)[0])

    def alive(self, slot: int, stale_after_s: float) -> bool:
        value = self.read(slot)
        return value > 0 and time.monotonic() - value < stale_after_s


#: Set by a supervisor for each worker process it starts: ``<board path>:<slot>``.
SLOT_ENV = "LLM_WORKER_LIVENESS_SLOT"


class ConsumerState:
    """Written by Celery signals and the transport; read by the health server's threads."""

    def __init__(self) -> None:
        self._ready = False
        self._shutting_down = False
        self.last_consumed = 0.0
        self._lock = threading.Lock()
        self._board: LivenessBoard | None = None
        self._slot = 0

    def attach(self, spec: str) -> None:
        """Mirror this state into a supervisor's board (``<path>:<slot>``)."""
        path, _, slot = spec.rpartition(":")
        self._board, self._slot = LivenessBoard(Path(path), int(slot) + 1), int(slot)
        self._mirror()

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value
        self._mirror()

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        self._shutting_down = value
        self._mirror()

    def consumed(self) -> None:
        """Record a proof of consumption (a BRPOP sent, or a saturated poll)."""
        now = time.monotonic()
        with self._lock:
            self.last_consumed = now
        if self._board is not None:
            self._mirror()

    def _mirror(self) -> None:
        if self._board is None:
            return
        if self._shutting_down:
            value = -1.0
        elif self._ready:
            value = max(self.last_consumed, 1e-9)
        else:
            value = 0.0
        self._board.write(self._slot, value)

    def alive(self, stale_after_s: float) -> bool:
        """Started, not shutting down, and consumed within the last ``stale_after_s``."""
        return (
            self.ready
            and not self.shutting_down
            and time.monotonic() - self.last_consumed < stale_after_s
        )


#: The one state of this process (the consumer runs in the main process under every pool).
STATE = ConsumerState()
