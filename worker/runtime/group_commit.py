"""Group commit: the writes of many concurrent jobs share one Redis round trip.

A streaming job writes each network read's events (``XADD`` + ``PUBLISH``). With hundreds
of streams per process, one pipeline per read is hundreds of round trips per second, each
paying a pool checkout, a send and a wait; and a job that waits for each of its writes pays
two greenlet switches per read besides.

:class:`GroupCommitter` queues writes and one flusher (a thread; a greenlet under gevent)
sends everything queued in one pipeline, then the next batch. Posted writes (chunks) wait up
to ``linger_s`` for more to join them: on a quiet machine a round trip takes a fraction of a
millisecond, so without it each network read of each stream cost a round trip of its own
(the burst benchmark measured 1.65x the direct client's CPU per stream without a linger,
about 1.45x with 1 ms; docs/performance.md). A waited write (:meth:`GroupCommitter.write`)
never lingers: it cuts a linger short and goes at once.

- :meth:`GroupCommitter.post` queues and returns at once; the job checks the outcome later
  (:class:`Pending`). Its chunks go this way: nothing waits for a round trip per read.
- :meth:`GroupCommitter.write` queues and waits until stored; so does :meth:`Pending.settle`
  for everything a job posted. A job settles before its terminal event (written by another
  script, which must come after them).

Order is kept per caller (its commands are contiguous, batches are sent in order), and a
failed command fails only the write that queued it. Commands are packed into RESP here,
about three times cheaper than redis-py's pipeline, and replies are returned raw (no
response callbacks). A connection error is retried with the client's retry policy; a write
retried after a lost connection may be stored twice (readers skip a repeated ``seq``).
Past ``max_pending`` queued commands, :meth:`post` waits like :meth:`write` (back-pressure
when Redis is slower than the jobs).

Scripts registered with :meth:`GroupCommitter.script` are called by their SHA1 (``EVALSHA``);
a batch that calls one starts with its ``SCRIPT LOAD``: the body crosses the wire once per
round trip, not once per command (an 1,100-byte ``append.lua`` was most of every chunk write),
and no reply can be ``NOSCRIPT`` after a Redis restart.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import ResponseError

Command = tuple[Any, ...]


def pack(command: Command) -> bytes:
    """One command in RESP: ``*<n>`` then ``$<len>`` + bytes per argument."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            raise TypeError("a bool is not a Redis argument")  # as redis-py refuses it
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send a {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Write:
    __slots__ = ("commands", "done", "error", "results", "urgent")

    def __init__(self, commands: Sequence[Command]) -> None:
        self.commands = commands
        self.urgent = False
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.results: list[Any] = []

    def outcome(self) -> list[Any]:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.results


class Pending:
    """One job's posted writes not yet known to be stored (one per job, one greenlet)."""

    __slots__ = ("_writes",)

    def __init__(self) -> None:
        self._writes: deque[_Write] = deque()

    def add(self, write: _Write) -> None:
        self.reap()
        self._writes.append(write)

    def reap(self) -> None:
        """Forget the writes already stored; raise the error of one that failed."""
        writes = self._writes
        while writes and writes[0].done.is_set():
            error = writes.popleft().error
            if error is not None:
                writes.clear()
                raise error

    def drain(self) -> None:
        """Wait until every posted write is done, ignoring errors (the job is over)."""
        while self._writes:
            self._writes.popleft().done.wait()

    def settle(self) -> None:
        """Wait until every posted write is stored; raise the first error."""
        while self._writes:
            write = self._writes.popleft()
            write.done.wait()
            if write.error is not None:
                self._writes.clear()
                raise write.error


class GroupCommitter:
    """Shared by every job of a process; safe from any thread or greenlet."""

    def __init__(
        self,
        client: redis.Redis[bytes],
        *,
        max_commands: int = 2000,
        max_pending: int = 20_000,
        linger_s: float = 0.0,
    ) -> None:
        self.redis = client
        self.max_commands = max_commands
        self.max_pending = max_pending
        self.linger_s = linger_s
        self._pid = -1
        self._scripts: dict[str, str] = {}
        self._start()

    def script(self, body: str) -> str:
        """Register a Lua script; returns its SHA1, for commands ``("EVALSHA", sha, ...)``."""
        sha = hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()
        self._scripts[sha] = body
        return sha

    def _start(self) -> None:
        """State for this process (again in a forked child, whose flusher did not survive)."""
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Write] = deque()
        self._queued_commands = 0
        self._idle = False  # the flusher waits for work
        self._lingering = False  # the flusher waits for more posts to join a batch
        self._urgent = 0  # queued writes someone waits for: no linger while there are any
        self._flusher: threading.Thread | None = None

    def post(self, commands: Sequence[Command], *, urgent: bool = False) -> _Write:
        """Queue ``commands`` (tuples of command arguments); returns without waiting.
        ``urgent``: the caller waits for it, so it goes without a linger."""
        item = _Write(commands)
        if self._pid != os.getpid():
            self._start()
        with self._cond:
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._run, name="llmw-group-commit", daemon=True
                )
                self._flusher.start()
            self._queue.append(item)
            self._queued_commands += len(commands)
            backlog = self._queued_commands > self.max_pending
            if urgent:
                item.urgent = True
                self._urgent += 1
            if self._idle or (urgent and self._lingering):
                self._idle = self._lingering = False
                self._cond.notify()
        if backlog:
            item.done.wait()
        return item

    def write(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` and return their raw replies once stored."""
        return self.post(commands, urgent=True).outcome()

    def _run(self) -> None:
        try:
            self._flush_forever()
        finally:  # killed (interpreter or hub shutting down): the next post starts another
            with self._cond:
                self._flusher = None
                self._idle = False

    def _flush_forever(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._idle = True
                    self._cond.wait()
                if self.linger_s and not self._urgent and self._queued_commands < self.max_commands:
                    # Let more posts join; a write someone waits for ends the wait (post()).
                    self._lingering = True
                    self._cond.wait(self.linger_s)
                    self._lingering = False
                batch: list[_Write] = []
                size = 0
                while self._queue and (not batch or size < self.max_commands):
                    item = self._queue.popleft()
                    batch.append(item)
                    size += len(item.commands)
                    self._urgent -= item.urgent
                self._queued_commands -= size
            self._send(batch)

    def _send(self, batch: list[_Write]) -> None:
        try:
            loads = [
                ("SCRIPT", "LOAD", self._scripts[sha])
                for sha in {
                    c[1]
                    for item in batch
                    for c in item.commands
                    if c[0] == "EVALSHA" and c[1] in self._scripts
                }
            ]
            payload = b"".join(
                [*map(pack, loads), *(pack(c) for item in batch for c in item.commands)]
            )
            count = len(loads) + sum(len(item.commands) for item in batch)
            replies = self._round_trip(payload, count)[len(loads) :]
        except BaseException as exc:  # the connection failed: every write of the batch did
            for item in batch:
                item.error = exc
                item.done.set()
            if not isinstance(exc, Exception):
                raise
            return
        offset = 0
        for item in batch:
            item.results = replies[offset : offset + len(item.commands)]
            offset += len(item.commands)
            item.error = next((r for r in item.results if isinstance(r, Exception)), None)
            item.done.set()

    def _round_trip(self, payload: bytes, count: int) -> list[Any]:
        pool = self.redis.connection_pool
        conn = pool.get_connection()

        def send_and_read() -> list[Any]:
            conn.send_packed_command([payload])
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies

        try:
            return conn.retry.call_with_retry(send_and_read, lambda _: conn.disconnect())  # type: ignore[no-any-return]
        except BaseException:
            conn.disconnect()  # the replies of what was sent may still be on the way
            raise
        finally:
            pool.release(conn)
