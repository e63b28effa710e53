"""Group commit: the writes of many concurrent jobs share one Redis round trip.

A streaming job writes each network read's events (``XADD`` + ``PUBLISH``) and must know
they are stored before it goes on (its terminal event, written by a separate script, must
come after them). With hundreds of streams per process, one pipeline per read is hundreds of
round trips per second, each paying a pool checkout, a send and a wait.

:class:`GroupCommitter` queues each caller's commands and blocks it until they are written.
The first caller to find nobody flushing becomes the *leader*: it sends everything queued in
one pipeline, wakes the callers whose commands it carried, and hands the lead to the first
caller still waiting (so no job flushes for others forever). While a flush is on the wire,
new writes gather for the next one. No timer: an idle process flushes at once, a busy one
batches as much as arrived during one round trip. Works with threads and with gevent
(``threading`` is patched).

Order is kept per caller (its commands are contiguous, batches are sent in order), and a
failed command fails only the caller that queued it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import redis

Command = tuple[Any, ...]


class _Write:
    __slots__ = ("commands", "done", "error", "lead", "results")

    def __init__(self, commands: Sequence[Command]) -> None:
        self.commands = commands
        self.done = threading.Event()
        self.lead = False
        self.error: BaseException | None = None
        self.results: list[Any] = []


class GroupCommitter:
    """Shared by every job of a process; ``write`` is safe from any thread or greenlet."""

    def __init__(self, client: redis.Redis[bytes], *, max_commands: int = 2000) -> None:
        self.redis = client
        self.max_commands = max_commands
        self._lock = threading.Lock()
        self._queue: list[_Write] = []
        self._flushing = False

    def write(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` (tuples of command arguments) and return their replies."""
        item = _Write(commands)
        with self._lock:
            self._queue.append(item)
            lead = not self._flushing
            if lead:
                self._flushing = True
        if not lead:
            item.done.wait()
            if not item.lead:
                return _outcome(item)
        self._flush_until(item)
        return _outcome(item)

    def _flush_until(self, own: _Write) -> None:
        """Lead: flush batches until our own write is out, then pass the lead on."""
        while True:
            with self._lock:
                batch: list[_Write] = []
                size = 0
                while self._queue and (not batch or size < self.max_commands):
                    item = self._queue.pop(0)
                    batch.append(item)
                    size += len(item.commands)
            self._send(batch)
            with self._lock:
                if own in batch:  # _send has answered it
                    if self._queue:
                        heir = self._queue[0]
                        heir.lead = True
                        heir.done.set()  # wakes it as the next leader, its write not sent
                    else:
                        self._flushing = False
                    return

    def _send(self, batch: list[_Write]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for item in batch:
            for command in item.commands:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        try:
            replies = pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed: every write of the batch did
            for item in batch:
                item.error = exc
                item.lead = False
                item.done.set()
            return
        offset = 0
        for item in batch:
            item.results = list(replies[offset : offset + len(item.commands)])
            offset += len(item.commands)
            item.error = next((r for r in item.results if isinstance(r, Exception)), None)
            item.lead = False
            item.done.set()


def _outcome(item: _Write) -> list[Any]:
    if item.error is not None:
        raise item.error
    return item.results
